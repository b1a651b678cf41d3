"""sinklens on a GPU, checked in one command that can fail, and recorded: the ``gpu`` tests, and a
Table-1 row and a scan of a 7B-shaped model, each timed against plain Hugging Face doing the same
work.

    python bench/gpu_check.py --prepare                    # here: .gpu/, what travels to the GPU
    python bench/gpu_check.py --dry-run --out check.json   # here: the same check on the CPU
    python3 bench/gpu_check.py --install .gpu --out $OUT/gpu_check.json   # on the GPU machine

``--prepare`` builds ``.gpu/``: the wheels of sinklens and of every package it needs that the GPU
machine's image lacks (``bench/gpu_image.txt``; TransformerLens, plotly, datasets, ...), for that
image's Python 3.12, installable with ``pip install --no-index --no-deps``, the natural text the
Table-1 row reads, and a manifest naming the commit of the tree it was built from. It checks that
``.gpu/`` and the working tree together stay under the 64 MiB a device call carries.

**The record.** The check writes one JSON record (``--out``; rewritten after every part, so a run
cut short keeps what it measured): the machine (GPU, driver, CUDA, CPU count), the version of every
installed package, and every figure it measured with the command that made it (``figures``). A GPU
run's record is committed under ``bench/results/``, and ``python bench/gpu_tables.py`` writes the
tables of docs/results.md ("On a GPU") from the committed records, so every GPU number there names
its record.

The parts, one line each as they finish:

* ``requirements``: every package sinklens requires, the version installed and whether it is in
  range;
* ``gpu_tests``: ``pytest -m gpu tests/test_gpu.py``, each test's outcome and the numbers it
  recorded;
* ``table``: a randomly initialised checkpoint of Llama-2-7B's shape (32 layers, d_model 4096, d_mlp
  11008, 32,000 embeddings), stored in bfloat16 with a sink planted in it (neuron 7890 of layer 1
  writes a large vector whenever the BOS token is alone in its residual stream: the answer the row
  must find), built on the machine. Its Table-1 row (``sink_table_row``, what ``sinklens table
  --device cuda`` runs), loaded in the checkpoint's own dtype (``load_model(dtype=None)``), with
  layers on demand and with the whole model, each in a fresh process, against plain Hugging Face
  (SDPA) doing **the same work**: the row's forward passes are recorded in an untimed run (their
  tokens, and how many layers each ran), and the plain model replays exactly those, each stopped
  after the same layer, without the final norm or the head. Both sides are warmed up and
  synchronised, nothing is recorded while they are timed, and each lists the layers it ran
  (``layers_run``, per forward pass) and its tokens. The row's time is also split into its forward
  passes and everything else (a run of its own, synchronised around each forward pass);
* ``scan``: tokens per second of the vocabulary scan at 1,000 repeats on that model at the CPU's and
  the GPU's default batch (``sinklens.load.sources.scan_batch_default``), and the time a whole
  32,000-token vocabulary takes at the faster.

**The exit status** is 0 only when nothing failed (:func:`failures`): a part that errors, a ``gpu``
test that fails or, on a machine with CUDA, is skipped, a row that misses the planted sink (its
layer or its neuron), row and plain sides that did not run the same layers and tokens, a requirement
missing or out of range, or a comparison beyond its stated tolerance (on CUDA the row within 1.5x of
the plain forwards).

``--dry-run`` runs every part on the CPU with a small model of the same construction (the ``gpu``
tests are collected and skip, and speed tolerances are recorded but not enforced), so a change that
breaks the check fails a unit test here (``tests/test_bench.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
import zipfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGE = Path(__file__).with_name("gpu_image.txt")
DEVICE_CALL_BYTES = 64 * 2**20
PYTHON = "3.12"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# TransformerLens requires these but sinklens never imports them: wandb (for training runs; 20 MB)
# and transformers-stream-generator (for one model family; an sdist, no wheel)
NEVER_IMPORTED = {"wandb", "transformers-stream-generator"}
# Versions carried instead of constraints.txt's: datasets 5.0 asks pyarrow>=21 where 5.2 asks >=24,
# and which pyarrow the image holds is not known (TransformerLens imports datasets, which imports
# pyarrow)
CARRIED = {"datasets": "5.0.0"}

LLAMA_2_7B: dict[str, Any] = dict(  # LlamaConfig keyword arguments
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32000,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
SMALL: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=16,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=32000,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
)
SINK_LAYER = 1
SINK_NEURON = {"gpu": 7890, "dry-run": 77}  # Llama-2-7B's first sink neuron, for the full shape
WORDS = ["the", "you"]
N_REPEATS = 1000
SCAN_TOKENS = 64
VOCABULARY = 32000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--prepare", action="store_true", help="build .gpu/ here (wheels, text) and check its size"
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="run the check on the CPU with a small model"
    )
    parser.add_argument(
        "--install",
        type=Path,
        metavar="DIR",
        help="install the wheels of DIR/wheels into a temporary folder first (on the GPU machine)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("gpu_check.json"), help="the JSON file of results"
    )
    parser.add_argument(
        "--work", type=Path, help="where the checkpoint is built (default: a temporary folder)"
    )
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    if args.prepare:
        return prepare(ROOT / ".gpu")
    if args.install:
        return install_and_rerun(args.install)
    return check(args.out, dry_run=args.dry_run, work=args.work)


# --- prepare: here
# --------------------------------------------------------------------------------------------------


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages() -> set[str]:
    return {
        _normal(line)
        for line in IMAGE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }


def pinned_versions() -> dict[str, str]:
    """The versions of constraints.txt, which the wheels carried take where they name one."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==", 1)
            pins[_normal(name)] = version.strip()
    return pins


def _requirements(wheel: Path) -> list:
    """The requirements a wheel declares for Python 3.12 on Linux, without extras."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(wheel) as archive:
        metadata = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    environment = {
        "python_version": PYTHON,
        "python_full_version": f"{PYTHON}.3",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_machine": "x86_64",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
        "os_name": "posix",
        "extra": "",
    }
    found = []
    for line in lines:
        if line.startswith("Requires-Dist:"):
            requirement = Requirement(line.split(":", 1)[1].strip())
            if requirement.marker is None or requirement.marker.evaluate(environment):
                found.append(requirement)
    return found


def _download(requirement: str, folder: Path) -> Path:
    before = set(folder.glob("*.whl"))
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        PYTHON,
        "--implementation",
        "cp",
        "--dest",
        str(folder),
        requirement,
    ]
    for tag in PLATFORMS:
        command += ["--platform", tag]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    new = set(folder.glob("*.whl")) - before
    name = _normal(re.split(r"[<>=!~ \[]", requirement, maxsplit=1)[0])
    return (
        next(iter(new))
        if new
        else next(w for w in folder.glob("*.whl") if _normal(w.name.split("-")[0]) == name)
    )


def prepare(folder: Path) -> int:
    """Build ``folder``: sinklens' wheel, the wheels of what the GPU image lacks (followed through
    their own requirements until the image has them), the natural text, and a manifest; then check
    the size."""
    import shutil

    wheels = folder / "wheels"
    shutil.rmtree(folder, ignore_errors=True)
    wheels.mkdir(parents=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--quiet",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
            str(ROOT),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    image, pins = image_packages(), pinned_versions()
    todo, carried = list(_requirements(next(wheels.glob("sinklens-*.whl")))), {}
    while todo:
        requirement = todo.pop()
        name = _normal(requirement.name)
        if name in image or name in carried or name in NEVER_IMPORTED:
            continue
        version = CARRIED.get(name, pins.get(name))
        wheel = _download(f"{name}=={version}" if version else str(requirement), wheels)
        carried[name] = wheel.name
        todo += _requirements(wheel)
    from sinklens.load.corpus import shakespeare

    (folder / "coriolanus.txt").write_text(shakespeare(), encoding="utf-8")
    tree = sum(
        int(line.split()[3])
        for line in subprocess.run(
            ["git", "ls-tree", "-r", "-l", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        if line.split()[3] != "-"
    )
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    manifest = {
        "carried": dict(sorted(carried.items())),
        "bytes": size,
        "working_tree_bytes": tree,
        "image": str(IMAGE.relative_to(ROOT)),
        "prepared": datetime.now(UTC).isoformat(),
        "tree": tree_state(),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=1))
    print(
        f"{folder}: {len(carried) + 1} wheels ({', '.join(sorted(carried))} and sinklens), "
        f"{size / 2**20:.1f} MiB; "
        f"with the working tree ({tree / 2**20:.1f} MiB) {(size + tree) / 2**20:.1f} of "
        f"{DEVICE_CALL_BYTES // 2**20} MiB"
    )
    if size + tree > DEVICE_CALL_BYTES:
        print("too large for a device call: carry fewer wheels", file=sys.stderr)
        return 1
    return 0


# --- the check: on the GPU machine (or here with --dry-run)
# ---------------------------------------------------------


def install_and_rerun(folder: Path) -> int:
    """Install ``folder/wheels`` into a temporary site folder (nothing of the image is replaced) and
    run the check again with it on the path, after the repository's own sources."""
    site = Path(tempfile.mkdtemp(prefix="sinklens-site-"))
    wheels = sorted(str(w) for w in (folder / "wheels").glob("*.whl"))
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--target",
            str(site),
            *wheels,
        ],
        check=True,
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(site), os.environ.get("PYTHONPATH", "")]),
        "SINKLENS_GPU_CORPUS": str(folder / "coriolanus.txt"),
    }
    rest = [a for a in sys.argv[1:] if a not in ("--install", str(folder), str(folder).rstrip("/"))]
    return subprocess.run([sys.executable, __file__, *rest], env=env).returncode


RECORD_FORMAT = "sinklens-gpu-check/2"
ROW_OVER_PLAIN = (
    1.5  # on CUDA the Table-1 row within 1.5x of plain HF forwards of the same tokens and layers
)
PREVIOUS_SCAN = {
    "4": 248.5,
    "32": 484.5,
}  # tokens/s, the last release's H200 run of 2026-12-04 (no record)


class Report:
    """The JSON record, written again after every part."""

    def __init__(self, path: Path, dry_run: bool):
        self.path = path
        self.data: dict[str, Any] = {
            "record": RECORD_FORMAT,
            "date": datetime.now(UTC).isoformat(),
            "dry_run": dry_run,
            "command": " ".join(["python", "bench/gpu_check.py", *sys.argv[1:]]),
            "tree": tree_state(),
        }

    def part(self, name: str, run) -> None:
        start = time.perf_counter()
        try:
            self.data[name] = run()
        except Exception as exc:  # a part that breaks is a result too; the others still run
            self.data[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        self.data[name] = {**self.data[name], "part_seconds": round(time.perf_counter() - start, 1)}
        self.write()
        print(f"{name}: {json.dumps(self.data[name])[:600]}", flush=True)

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        tmp.replace(self.path)


def check(out: Path, *, dry_run: bool, work: Path | None) -> int:
    import torch

    cuda = torch.cuda.is_available()
    if not dry_run and not cuda:
        print("no CUDA GPU here: run with --dry-run", file=sys.stderr)
        return 2
    report = Report(out, dry_run)
    report.part("machine", machine)
    report.part("packages", packages)
    report.part("requirements", requirements)
    report.part("gpu_tests", lambda: gpu_tests(out.parent))
    with tempfile.TemporaryDirectory(prefix="sinklens-gpu-check-", dir=work) as scratch:
        checkpoint = Path(scratch) / "checkpoint"
        report.part(
            "checkpoint", lambda: build_checkpoint(checkpoint, "dry-run" if dry_run else "gpu")
        )
        device = "cpu" if dry_run else "cuda"
        report.part("table", lambda: table(checkpoint, device, Path(scratch), dry_run))
        report.part("scan", lambda: report.data["table"].pop("scan"))
    report.data["figures"] = figures(report.data)
    found = failures(report.data, cuda=cuda and not dry_run)
    report.data["failures"] = found
    report.data["exit_status"] = 1 if found else 0
    report.write()
    tests = report.data["gpu_tests"]
    print(
        json.dumps(
            {
                "bench": "gpu_check",
                "out": str(out),
                "failures": found,
                "gpu_tests": {k: tests.get(k) for k in ("passed", "failed", "skipped")},
            }
        )
    )
    return int(report.data["exit_status"])


# --- what makes the check fail
# ---------------------------------------------------------------------------------------


def failures(data: dict, *, cuda: bool) -> list[str]:
    """Why a check's record fails, one line each (empty: it passes). ``cuda``: the machine had a
    GPU, so a skipped ``gpu`` test is a failure and speed tolerances are enforced. Reads only the
    record, so crafted records test it (tests/test_bench.py)."""
    found = [
        f"part {name} errored: {part['error'][:300]}"
        for name, part in data.items()
        if isinstance(part, dict) and "error" in part
    ]
    for name in ("machine", "requirements", "gpu_tests", "table", "scan"):
        if name not in data:
            found.append(f"part {name} did not run")
    requirements_ = data.get("requirements", {})
    found += [f"requirement missing: {name}" for name in requirements_.get("missing", [])]
    found += [
        f"requirement out of range: {text}" for text in requirements_.get("outside_range", [])
    ]
    tests = data.get("gpu_tests", {})
    if "error" not in tests and "tests" in tests:
        found += [
            f"gpu test failed: {name}"
            for name, test in tests["tests"].items()
            if test["outcome"] == "failed"
        ]
        if cuda:
            found += [
                f"gpu test skipped on a machine with CUDA: {name} ({test.get('message', '')[:200]})"
                for name, test in tests["tests"].items()
                if test["outcome"] == "skipped"
            ]
            if not tests["tests"]:
                found.append("no gpu test ran on a machine with CUDA")
    table_ = data.get("table", {})
    if "error" not in table_ and "sides" in table_:
        planted = table_["planted"]
        for side in ROW_SIDES:
            row = table_["sides"].get(side, {}).get("row", {})
            if row.get("sink_layer") != planted[0]:
                found.append(
                    f"{side}: the row's sink layer is {row.get('sink_layer')}, the planted one "
                    f"{planted[0]}"
                )
            if planted[1] not in (row.get("sink_neurons") or []):
                found.append(
                    f"{side}: the row's sink neurons {row.get('sink_neurons')} miss the planted "
                    f"{planted[1]}"
                )
        for comparison in table_.get("comparisons", []):
            if comparison["enforced"] and not comparison["within"]:
                found.append(
                    f"{comparison['name']} is {comparison['value']}, beyond its tolerance "
                    f"{comparison['tolerance']}"
                )
    return found


def compare(name: str, value, tolerance: str, enforced: bool = True) -> dict:
    """A comparison and its stated tolerance: ``== X`` (equal) or ``<= X`` (at most); ``within``
    says whether the value keeps it, ``enforced`` whether the exit status depends on it."""
    kind, _, bound = tolerance.partition(" ")
    within = (
        value == json.loads(bound) if kind == "==" else value is not None and value <= float(bound)
    )
    return {
        "name": name,
        "value": value,
        "tolerance": tolerance,
        "within": bool(within),
        "enforced": enforced,
    }


# --- the machine and what it runs
# ------------------------------------------------------------------------------------


def tree_state() -> dict:
    """The commit the checked code is (``git``, or the manifest ``--prepare`` wrote where git is
    absent)."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        return {"commit": commit.stdout.strip(), "changed_files": len(dirty.stdout.splitlines())}
    except (OSError, subprocess.CalledProcessError):
        manifest = ROOT / ".gpu" / "manifest.json"
        if manifest.is_file():
            return {
                **json.loads(manifest.read_text()).get("tree", {}),
                "from": ".gpu/manifest.json",
            }
        return {"commit": None}


def _driver() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return version.decode() if isinstance(version, bytes) else version
    except Exception:  # no NVML: the driver stays unnamed
        return None


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_properties(0) if torch.cuda.is_available() else None
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if gpu else None,
        "driver": _driver() if gpu else None,
        "gpu": None
        if gpu is None
        else {
            "name": gpu.name,
            "memory_gib": round(gpu.total_memory / 2**30, 1),
            "multiprocessors": gpu.multi_processor_count,
            "capability": f"{gpu.major}.{gpu.minor}",
            "count": torch.cuda.device_count(),
        },
        "cpus": os.cpu_count(),
    }


def packages() -> dict:
    """The version of every installed package (the image's and the carried wheels'), by name."""
    from importlib.metadata import distributions

    found = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name and _normal(name) not in found:
            found[_normal(name)] = dist.version
    return {"count": len(found), "versions": dict(sorted(found.items()))}


def requirements() -> dict:
    """Each requirement of sinklens (and of TransformerLens, which it imports), the version
    installed, and whether it satisfies the range."""
    from importlib.metadata import PackageNotFoundError, requires, version

    from packaging.requirements import Requirement

    found, missing, outside = {}, [], []
    for package in ("sinklens", "transformer-lens"):
        for text in requires(package) or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                installed = version(requirement.name)
            except PackageNotFoundError:
                installed = None
                if _normal(requirement.name) not in NEVER_IMPORTED:
                    missing.append(requirement.name)
            ok = installed is not None and requirement.specifier.contains(
                installed, prereleases=True
            )
            if installed is not None and not ok:
                outside.append(f"{requirement.name} {installed} not {requirement.specifier}")
            found[f"{package}: {requirement.name}"] = {
                "range": str(requirement.specifier),
                "installed": installed,
                "in_range": ok,
            }
    import transformer_lens  # noqa: F401  (what must import, whatever the metadata says)

    return {"missing": missing, "outside_range": outside, "packages": found}


def gpu_tests(folder: Path) -> dict:
    """``pytest -m gpu`` on tests/test_gpu.py, each test's outcome and recorded numbers."""
    xml = folder / "gpu_tests.xml"
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-m",
        "gpu",
        "-p",
        "no:cacheprovider",
        "-q",
        "-o",
        "junit_family=xunit1",
        f"--junitxml={xml}",
        "tests/test_gpu.py",
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if not xml.is_file():
        raise RuntimeError(
            f"pytest wrote no results (exit {proc.returncode}): "
            f"{proc.stdout[-1500:]}{proc.stderr[-1500:]}"
        )
    tests, counts = {}, {"passed": 0, "failed": 0, "skipped": 0}
    for case in ElementTree.parse(xml).iter("testcase"):
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = (child.get("message") or child.text or "")[:600]
            elif child.tag == "skipped":
                outcome, message = "skipped", child.get("message", "")
        counts[outcome] += 1
        # keys from the XML: a property without a name gives None
        record: dict[str | None, Any] = {
            "outcome": outcome,
            "seconds": round(float(case.get("time", 0)), 2),
        }
        record.update({p.get("name"): p.get("value") for p in case.iter("property")})
        if outcome != "passed":
            record["message"] = message
        tests[case.get("name")] = record
    xml.unlink()
    return {**counts, "tests": tests, "command": "python -m pytest -m gpu tests/test_gpu.py"}


def build_checkpoint(directory: Path, kind: str) -> dict:
    """A random Llama of Llama-2-7B's shape (``SMALL`` for the dry run) in bfloat16 with a planted
    sink, and a byte-level BPE tokenizer trained on the natural text, written as a sharded Hugging
    Face checkpoint.

    The plant: only the BOS embedding has a component on residual dimension 0, no attention output
    or MLP writes to that dimension, and neuron ``SINK_NEURON`` of layer ``SINK_LAYER`` reads it
    (gate and up weights on it alone) and writes a vector 100 times the typical norm there. So the
    first token's MLP output explodes at that layer, and no other token ever fires the neuron. The
    weights are calibrated on the model's first layers run in float32 (:func:`_calibrated_sink`)."""
    import torch
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    start = time.perf_counter()
    shape = SMALL if kind == "dry-run" else LLAMA_2_7B
    neuron = SINK_NEURON[kind]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=min(shape["vocab_size"], 4000),
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator([corpus_text()], trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    bos = tokenizer.bos_token_id
    config = LlamaConfig(
        **shape,
        bos_token_id=bos,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
        # a legacy keyword that transformers' dataclass configs take at run time, unlike their stubs
        torch_dtype="bfloat16",  # type: ignore[call-arg]
        architectures=["LlamaForCausalLM"],
    )
    d, f, v = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    generator = torch.Generator(device).manual_seed(0)

    def random(*size):
        return (torch.randn(size, generator=generator, device=device) * 0.02).to(torch.bfloat16)

    directory.mkdir(parents=True)
    embed = random(v, d)
    embed[:, 0] = 0.0
    embed[bos, 0] = 1.0
    weight_map, total = {}, 0

    def save(tensors: dict, index: int) -> None:
        nonlocal total
        name = f"model-{index:05d}.safetensors"
        save_file(
            {k: t.cpu().contiguous() for k, t in tensors.items()},
            directory / name,
            metadata={"format": "pt"},
        )
        weight_map.update({key: name for key in tensors})
        total += sum(t.numel() * 2 for t in tensors.values())

    early = {"model.embed_tokens.weight": embed}
    save(
        {
            "model.embed_tokens.weight": embed,
            "model.norm.weight": torch.ones(d, dtype=torch.bfloat16),
            "lm_head.weight": random(v, d),
        },
        0,
    )
    for layer in range(shape["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors = {p + f"self_attn.{x}_proj.weight": random(d, d) for x in "qkvo"}
        tensors |= {
            p + "mlp.gate_proj.weight": random(f, d),
            p + "mlp.up_proj.weight": random(f, d),
            p + "mlp.down_proj.weight": random(d, f),
            p + "input_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(d, dtype=torch.bfloat16),
        }
        tensors[p + "self_attn.o_proj.weight"][0] = 0.0
        tensors[p + "mlp.down_proj.weight"][0] = 0.0
        if layer < SINK_LAYER:
            early |= tensors
        if layer == SINK_LAYER:
            for gate in ("gate", "up"):
                tensors[p + f"mlp.{gate}_proj.weight"][neuron] = 0.0
            tensors[p + "mlp.down_proj.weight"][:, neuron] = 0.0
            reads, writes = _calibrated_sink(config, early | tensors, tokenizer, device)
            for gate in ("gate", "up"):
                tensors[p + f"mlp.{gate}_proj.weight"][neuron, 0] = reads
            tensors[p + "mlp.down_proj.weight"][1:, neuron] = writes
        save(tensors, layer + 1)
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {
        "shape": shape,
        "dtype": "bfloat16",
        "tokenizer_vocabulary": len(tokenizer),
        "planted": [SINK_LAYER, neuron],
        "weights_gb": round(total / 1e9, 2),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _calibrated_sink(config, tensors: dict, tokenizer, device: str) -> tuple[float, float]:
    """The planted neuron's gate and up weight on dimension 0, and its write on every other
    dimension: a pre-activation of 20 on the lone BOS token (so ``silu(20) * 20``, about 400, after
    the gate), and an output 100 times the typical residual norm after layer ``SINK_LAYER``, both
    read off layers ``0..SINK_LAYER`` run in float32 on the BOS token followed by natural text."""
    import copy

    import torch
    from transformers import LlamaForCausalLM

    short = copy.deepcopy(config)
    short.num_hidden_layers = SINK_LAYER + 1
    # transformers' decorator on PreTrainedModel.to hides its bound signature from mypy
    model = LlamaForCausalLM(short).to(device, torch.float32).eval()  # type: ignore[arg-type]
    model.load_state_dict({k: t.float() for k, t in tensors.items()}, strict=False)
    ids = torch.tensor(
        [[tokenizer.bos_token_id, *tokenizer(corpus_text()[:2000]).input_ids[:200]]], device=device
    )
    seen = {}

    def read_bos_input(module, args) -> None:
        seen["input"] = args[0][
            0, 0, 0
        ].item()  # the MLP's normalised input, dimension 0, at the BOS token

    def read_output(module, args, output) -> None:
        seen["output"] = (
            output[0] if isinstance(output, tuple) else output
        )  # the residual stream after the layer

    layer = model.model.layers[SINK_LAYER]
    handles = [
        layer.mlp.register_forward_pre_hook(read_bos_input),
        layer.register_forward_hook(read_output),
    ]
    with torch.inference_mode():
        model(ids)
    for handle in handles:
        handle.remove()
    typical = float(seen["output"][0, 1:].norm(dim=-1).mean())
    reads = 20.0 / seen["input"]
    post = 20.0 * float(torch.nn.functional.silu(torch.tensor(20.0)))
    writes = 100.0 * typical / (post * (config.hidden_size - 1) ** 0.5)
    return reads, writes


def corpus_text() -> str:
    given = os.environ.get("SINKLENS_GPU_CORPUS")
    if given:
        return Path(given).read_text(encoding="utf-8")
    from sinklens.load.corpus import shakespeare

    return shakespeare()


ROW_SIDES = ("layers_on_demand", "whole_model")
ROW_KEYS = (
    "sink_layer",
    "sink_neurons",
    "first_token_norm",
    "first_token_norm_ablated",
    "typical_norm",
    "repeats_to_sink",
    "first_crossing",
)


def _run_worker(*args) -> dict:
    command = ["python", "bench/gpu_check.py", "--worker", *map(str, args)]
    proc = subprocess.run(
        [sys.executable, __file__, "--worker", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args[0]} failed: {proc.stderr[-1500:]}")
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "command": " ".join(command)}


def table(checkpoint: Path, device: str, scratch: Path, dry_run: bool) -> dict:
    """The Table-1 row with layers on demand and with the whole model, and plain HF replaying the
    row's forward passes; the comparisons between them, each with its tolerance."""
    corpus = scratch / "corpus.txt"
    corpus.write_text(corpus_text(), encoding="utf-8")
    rounds = 2 if dry_run else 3
    early = _run_worker(
        "row", checkpoint, device, corpus, "early", scratch / "early-batches.pt", rounds
    )
    whole = _run_worker(
        "row", checkpoint, device, corpus, "whole", scratch / "whole-batches.pt", rounds
    )
    plain = _run_worker(
        "plain", checkpoint, device, scratch / "early-batches.pt", early["dtype"], rounds
    )
    sides = {"layers_on_demand": early, "whole_model": whole, "plain_hf_sdpa": plain}
    result: dict[str, Any] = {
        "planted": [SINK_LAYER, SINK_NEURON["dry-run" if dry_run else "gpu"]],
        "rounds": rounds,
        "sides": {
            name: {key: v for key, v in side.items() if key != "scan"}
            for name, side in sides.items()
        },
        "scan": {**early["scan"], "command": early["command"]},
    }
    speed = (
        not dry_run
    )  # speed is measured on the CPU too, but only a GPU's is held to its tolerance
    comparisons = [
        compare(
            "layers_on_demand: the same row as the whole model",
            early["row"] == whole["row"],
            "== true",
        )
    ]
    for name in ROW_SIDES:
        side = sides[name]
        comparisons += [
            compare(
                f"{name}: layers_run equal to plain HF's",
                side["layers_run"] == plain["layers_run"],
                "== true",
            ),
            compare(
                f"{name}: tokens equal to plain HF's", side["tokens"] == plain["tokens"], "== true"
            ),
            compare(
                f"{name}: row time over plain HF",
                round(side["row_seconds"] / plain["seconds"], 3),
                f"<= {ROW_OVER_PLAIN}",
                enforced=speed,
            ),
        ]
        result[f"{name}_time_over_plain"] = round(side["row_seconds"] / plain["seconds"], 3)
        result[f"{name}_forwards_over_plain"] = round(side["forward_seconds"] / plain["seconds"], 3)
        if plain["peak_gpu_bytes"]:  # on a GPU
            result[f"{name}_peak_memory_over_plain"] = round(
                side["peak_gpu_bytes"] / plain["peak_gpu_bytes"], 3
            )
    result["comparisons"] = comparisons
    planted = result["planted"]
    result["found_the_planted_sink"] = all(
        sides[name]["row"]["sink_layer"] == planted[0]
        and planted[1] in sides[name]["row"]["sink_neurons"]
        for name in ROW_SIDES
    )
    return result


def figures(data: dict) -> list[dict]:
    """Every figure the record holds, flat, each with its unit and the command that measured it
    (what ``bench/gpu_tables.py`` writes into docs/results.md)."""
    found = []

    def add(name: str, value, unit: str, command: str | None) -> None:
        if value is not None:
            found.append({"name": name, "value": value, "unit": unit, "command": command})

    tests = data.get("gpu_tests", {})
    for test, record in tests.get("tests", {}).items():
        add(f"gpu_tests.{test}.outcome", record["outcome"], "", tests.get("command"))
        for key, value in record.items():
            if key not in ("outcome", "seconds", "message"):
                add(f"gpu_tests.{test}.{key}", value, "", tests.get("command"))
    table_ = data.get("table", {})
    for name, side in table_.get("sides", {}).items():
        for key, unit in (
            ("load_seconds", "s"),
            ("row_seconds", "s"),
            ("seconds", "s"),
            ("forward_seconds", "s"),
            ("other_seconds", "s"),
            ("peak_gpu_bytes", "bytes"),
            ("tokens", "tokens"),
            ("forwards", "forward passes"),
            ("dtype", ""),
        ):
            add(f"table.{name}.{key}", side.get(key), unit, side.get("command"))
        if "row" in side:
            for key in ROW_KEYS:
                add(f"table.{name}.row.{key}", side["row"].get(key), "", side.get("command"))
    for comparison in table_.get("comparisons", []):
        add(
            f"table.comparison.{comparison['name']}",
            comparison["value"],
            comparison["tolerance"],
            "python bench/gpu_check.py",
        )
    scan = data.get("scan", {})
    for batch, rate in scan.get("tokens_per_second_by_batch", {}).items():
        add(f"scan.tokens_per_second.batch_{batch}", rate, "tokens/s", scan.get("command"))
    add("scan.default_batch", scan.get("default_batch"), "tokens", scan.get("command"))
    add(
        f"scan.exhaustive_{VOCABULARY}_token_minutes",
        scan.get(f"exhaustive_{VOCABULARY}_token_minutes"),
        "min",
        scan.get("command"),
    )
    return found


def worker(kind: str, *args: str) -> int:
    import torch

    torch.set_grad_enabled(False)
    result = row_worker(*args) if kind == "row" else plain_worker(*args)
    print(json.dumps(result))
    return 0


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_bytes(device: str) -> int | None:
    import torch

    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else None


def _reset_peak(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def recording(decoder, layers) -> tuple[list, list]:
    """Record every forward pass through ``decoder`` (a Hugging Face decoder: its input ids, on the
    CPU) and the layers of ``layers`` it completed; returns the records and the hook handles to
    remove. Only for untimed runs: the copies and hooks cost time."""
    runs: list = []
    handles = [
        decoder.register_forward_pre_hook(
            lambda module, args, kwargs: runs.append(
                {"ids": kwargs["input_ids"].cpu(), "layers": 0}
            ),
            with_kwargs=True,
        )
    ]

    def completed(module, args, output) -> None:
        runs[-1]["layers"] += 1

    handles += [layer.register_forward_hook(completed) for layer in layers]
    return runs, handles


def _timed(run, device: str) -> float:
    _synchronize(device)
    start = time.perf_counter()
    run()
    _synchronize(device)
    return time.perf_counter() - start


def row_worker(
    checkpoint: str, device: str, corpus: str, side: str, batches: str, rounds: str
) -> dict:
    """Load the checkpoint (its first layers only, or whole) in its own dtype, record the row's
    forward passes in an untimed run, warm up, time the row, time it again split into forward passes
    and the rest; with layers on demand, then time the scan."""
    import torch

    from sinklens.load.models import load_model, placement
    from sinklens.settings import Settings
    from sinklens.studies.table import sink_table_row

    settings = Settings(
        model=checkpoint, device=device, corpus=corpus, words=WORDS, n_repeats=N_REPEATS
    )
    text = settings.corpus_text()
    start = time.perf_counter()
    model = load_model(
        checkpoint,
        dtype=None,
        device=device,  # the checkpoint's dtype on a GPU
        n_layers=settings.layers_reached() if side == "early" else None,
    )
    _synchronize(device)
    load_seconds = time.perf_counter() - start
    loading_peak = _peak_bytes(device)
    decoder: Any = model.original_model.model
    runs, handles = recording(decoder, decoder.layers)
    sink_table_row(model, text, settings)  # recorded, untimed; also the first warm-up
    for handle in handles:
        handle.remove()
    torch.save(runs, batches)
    sink_table_row(model, text, settings)  # warm-up without the recorder
    _reset_peak(device)
    times = []
    for _ in range(int(rounds)):
        times.append(_timed(lambda: sink_table_row(model, text, settings), device))
    peak = _peak_bytes(device)
    inside = {"seconds": 0.0, "calls": 0}
    plain_forward = decoder.forward

    def timed_forward(*args, **kwargs):
        _synchronize(device)
        begin = time.perf_counter()
        try:
            return plain_forward(*args, **kwargs)
        finally:
            _synchronize(device)
            inside["seconds"] += time.perf_counter() - begin
            inside["calls"] += 1

    decoder.forward = timed_forward
    holder: dict[str, Any] = {}
    split_seconds = _timed(lambda: holder.update(row=sink_table_row(model, text, settings)), device)
    decoder.forward = plain_forward
    row = holder["row"].summary()
    result = {
        "load_seconds": round(load_seconds, 3),
        "row_seconds": round(min(times), 4),
        "row_seconds_each": [round(t, 4) for t in times],
        "forward_seconds": round(inside["seconds"], 4),
        "other_seconds": round(split_seconds - inside["seconds"], 4),
        "split_run_seconds": round(split_seconds, 4),
        "forwards": inside["calls"],
        "layers_run": [run["layers"] for run in runs],
        "tokens": sum(run["ids"].numel() for run in runs),
        "peak_gpu_bytes": peak,
        "peak_gpu_bytes_loading": loading_peak,
        "n_layers_built": model.cfg.n_layers,
        **placement(model),
        "row": {k: row[k] for k in ROW_KEYS},
    }
    if side == "early":
        result["scan"] = scan_rates(model, holder["row"].setup, settings, device)
    return result


def scan_rates(model, setup, settings, device: str) -> dict:
    """The scan's tokens per second at the CPU's and the GPU's default batch, each warmed up
    first."""
    import torch

    from sinklens.load.sources import SCAN_BATCH_CPU, SCAN_BATCH_CUDA, scan_batch_default
    from sinklens.studies.scan import scan_setup, scan_tokens

    prepared = scan_setup(model, settings.corpus_text(), settings, setup=setup)
    vocabulary = len(model.tokenizer)
    ids = torch.randperm(vocabulary, generator=torch.Generator().manual_seed(0))[
        :SCAN_TOKENS
    ].tolist()
    rates = {}
    for batch_size in sorted({SCAN_BATCH_CPU, SCAN_BATCH_CUDA}):
        scan_tokens(model, prepared, ids[:batch_size], batch_size=batch_size)  # warm-up
        seconds = _timed(
            lambda size=batch_size: scan_tokens(model, prepared, ids, batch_size=size), device
        )
        rates[str(batch_size)] = SCAN_TOKENS / seconds
    best = max(rates.values())
    return {
        "n_repeats": N_REPEATS,
        "tokens_timed": SCAN_TOKENS,
        "layers_run": prepared.layer + 1,
        "tokens_per_second_by_batch": {k: round(v, 2) for k, v in rates.items()},
        "fastest_batch": int(max(rates, key=lambda batch: rates[batch])),
        "default_batch": scan_batch_default(device),
        "default_from": "sinklens.load.sources.scan_batch_default",
        "default_chosen_on": {
            "tokens_per_second_by_batch": PREVIOUS_SCAN,
            "source": (
                "the last release's H200 run of 2026-12-04 (docs/results.md at 9ce0955), which "
                "left no record"
            ),
        },
        f"exhaustive_{VOCABULARY}_token_minutes": round(VOCABULARY / best / 60, 2),
    }


def plain_worker(checkpoint: str, device: str, batches: str, dtype: str, rounds: str) -> dict:
    """The row's recorded forward passes replayed on the whole model as plain Hugging Face runs it
    (SDPA), each stopped after the layers the row's pass ran (the decoder's layers cut, its final
    norm and the head never run), in the row's dtype; warmed up, synchronised, timed without
    recording."""
    import torch
    from transformers import AutoModelForCausalLM

    runs = torch.load(batches)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(
        checkpoint, dtype=getattr(torch, dtype), device_map=device, attn_implementation="sdpa"
    ).eval()
    _synchronize(device)
    load_seconds = time.perf_counter() - start
    decoder = model.model
    layers, norm = decoder.layers, decoder.norm
    inputs = [(run["ids"].to(device), run["layers"]) for run in runs]

    def replay() -> None:
        try:
            decoder.norm = torch.nn.Identity()
            for ids, depth in inputs:
                decoder.layers = layers[:depth]
                decoder(input_ids=ids, use_cache=False)
        finally:
            decoder.layers, decoder.norm = layers, norm

    with torch.inference_mode():
        seen, handles = recording(decoder, layers)
        replay()  # counted, untimed; also the warm-up
        for handle in handles:
            handle.remove()
        replay()  # warm-up without the counters
        _reset_peak(device)
        times = [_timed(replay, device) for _ in range(int(rounds))]
    return {
        "load_seconds": round(load_seconds, 3),
        "seconds": round(min(times), 4),
        "seconds_each": [round(t, 4) for t in times],
        "peak_gpu_bytes": _peak_bytes(device),
        "dtype": dtype,
        "forwards": len(seen),
        "layers_run": [run["layers"] for run in seen],
        "tokens": sum(run["ids"].numel() for run in seen),
    }


if __name__ == "__main__":
    sys.exit(main())
