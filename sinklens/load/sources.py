"""What a model spec, a dtype and a device name point to, checked without loading anything.

Everything here is plain Python (torch is imported only to ask whether a GPU asked for exists), so
the command line checks its arguments in a fraction of a second and a bad spec, dtype or device
fails before a model is loaded. :mod:`sinklens.load.models` does the loading.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from sinklens.errors import SinklensError
from sinklens.load.registry import MODEL_ALIASES

if TYPE_CHECKING:
    import torch

SourceKind = Literal["alias", "gguf", "hf_dir", "hub"]
DTYPE_NAMES = ("float32", "bfloat16", "float16")
SHARD_INDEX = "model.safetensors.index.json"
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


@dataclass(frozen=True)
class ModelSource:
    """Where a model spec points. ``name`` is the resolved model name recorded in results.

    ``bos_token_id`` is the tokenizer's own BOS (None if it has none), read before
    TransformerLens boots the model: the bridge substitutes EOS for a missing BOS.
    """

    spec: str
    kind: SourceKind
    name: str
    bos_token_id: int | None = None
    n_layers: int | None = None  # the checkpoint's depth
    layers_loaded: int | None = (
        None  # the first layers built, when fewer than n_layers (see load_model)
    )


def resolve_model(spec: str) -> ModelSource:
    """Classify a model spec without loading anything. Missing local paths are an error."""
    if spec in MODEL_ALIASES:
        return ModelSource(spec, "alias", MODEL_ALIASES[spec].hub_name)
    path = Path(spec).expanduser()
    looks_local = spec.startswith((".", "/", "~")) or spec.endswith(".gguf") or path.exists()
    if not looks_local:
        return ModelSource(spec, "hub", spec)
    if not path.exists():
        raise SinklensError(
            f"model path {spec} does not exist",
            f"pass an existing .gguf file or Hugging Face model directory, or a built-in alias ({aliases()})",
        )
    if path.is_file():
        if path.suffix != ".gguf":
            raise SinklensError(
                f"{spec} is a file but not a .gguf file",
                "pass a .gguf file, or the directory that holds config.json and the weights",
            )
        return ModelSource(spec, "gguf", str(path.resolve()))
    if not (path / "config.json").is_file():
        raise SinklensError(
            f"{spec} is a directory without config.json, so it is not a Hugging Face model directory",
            "pass the directory that save_pretrained() wrote (config.json, weights, tokenizer files)",
        )
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        raise SinklensError(
            f"{spec} has no tokenizer files ({', '.join(_TOKENIZER_FILES)})",
            "save the tokenizer into the same directory: tokenizer.save_pretrained(directory)",
        )
    index = shard_index(path / SHARD_INDEX)
    if index is not None:
        missing = sorted(
            name for name in set(index["weight_map"].values()) if not (path / name).is_file()
        )
        if missing:
            raise SinklensError(
                f"{path} is incomplete: its index {SHARD_INDEX} names {len(missing)} missing shard(s), "
                f"{', '.join(missing[:3])}",
                "copy or download the missing files into it",
            )
    return ModelSource(spec, "hf_dir", str(path.resolve()))


def shard_index(
    path: Path, *, fix: str = "save the model again with save_pretrained()"
) -> dict | None:
    """A sharded safetensors checkpoint's index (``{"weight_map": {tensor: shard file}, ...}``), or None when
    there is no such file (a checkpoint in one file). An index that is not one is an error saying ``fix``."""
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        index["weight_map"] = dict(index["weight_map"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SinklensError(
            f"{path} is not a safetensors index ({type(exc).__name__}: {exc})", fix
        ) from None
    return index


BACKENDS = ("transformer_lens", "nnsight")
"""How a model runs: a TransformerBridge here, or nnsight traces (here, or remote on NDIF)."""
REMOTE_TIMEOUT = 3600.0  # seconds a remote job may take, queueing included


def check_backend(backend: str) -> str:
    """``backend`` if it is one of :data:`BACKENDS`, else one clear error."""
    if backend not in BACKENDS:
        raise SinklensError(f"unknown backend {backend!r}", f"pass one of {', '.join(BACKENDS)}")
    return backend


def check_remote(
    backend: str, remote: bool | str, host: str | None, timeout: float, placed: bool = False
) -> None:
    """The checks of a remote run's choices that need no network; ``placed``: a dtype, device or memory cap
    was given, which a remote model (run by the server as its deployment says) cannot honour."""
    check_backend(backend)
    if remote is True and placed:
        raise SinklensError(
            "a remote model runs where and in the dtype the server's deployment says",
            "drop --dtype, --device and --max-memory with --remote",
        )
    if remote and backend != "nnsight":
        raise SinklensError(
            "remote runs go through nnsight", "add backend='nnsight' (CLI: --backend nnsight)"
        )
    if host is not None and remote is not True:
        raise SinklensError(
            "a host is only used by a remote run",
            "add --remote (Python: remote=True), or drop --host",
        )
    if host is not None and not host.startswith(("http://", "https://")):
        raise SinklensError(f"the host {host!r} is not a URL", "pass http(s)://host[:port]")
    if timeout != REMOTE_TIMEOUT and remote is not True:
        raise SinklensError(
            "a remote timeout is only used by a remote run",
            "add --remote (Python: remote=True), or drop --remote-timeout",
        )
    if not timeout > 0:
        raise SinklensError(
            f"the remote timeout must be positive, got {timeout}", "pass seconds, e.g. 3600"
        )


def aliases() -> str:
    return ", ".join(MODEL_ALIASES)


def check_dtype_name(name: str | torch.dtype) -> str:
    """``float32``, ``bfloat16`` or ``float16`` (a ``torch.`` prefix is accepted), checked."""
    bare = str(name).removeprefix("torch.")
    if bare not in DTYPE_NAMES:
        raise SinklensError(f"unknown dtype {name!r}", f"pass one of {', '.join(DTYPE_NAMES)}")
    return bare


def check_device(device: object) -> str | None:
    """``cpu``, ``cuda``, ``cuda:N`` or ``auto``, checked, with ``cuda`` read as ``cuda:0``; None stays None (the
    first GPU if there is one, else the CPU, decided at load). A GPU asked for must exist on this machine."""
    if device is None:
        return None
    name = str(device)
    kind, _, index = name.partition(":")
    if name in ("cpu", "auto"):
        return name
    if kind != "cuda" or index and not index.isdigit():
        raise SinklensError(f"unknown device {name!r}", "pass cpu, cuda, cuda:N or auto")
    import torch  # only a GPU asked for needs it

    if not torch.cuda.is_available():
        raise SinklensError(
            f"device {name} asked for, but this machine has no CUDA GPU (torch {torch.__version__})",
            "pass --device cpu, or run on a machine with a GPU and a CUDA build of torch",
        )
    if index and int(index) >= torch.cuda.device_count():
        raise SinklensError(
            f"device {name} asked for, but this machine has {torch.cuda.device_count()} GPU(s)",
            f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto",
        )
    return name if index else "cuda:0"


# --- what fits a device: the checkpoint's dtype, accelerate's memory caps, the scan's batch
# ------------------------

CHECKPOINT_DTYPES = {
    "float32": "float32",
    "float": "float32",
    "bfloat16": "bfloat16",
    "float16": "float16",
    "half": "float16",
}


def checkpoint_dtype_name(config: Mapping) -> str | None:
    """The dtype a checkpoint declares in its ``config.json`` (``dtype``, or ``torch_dtype`` as
    older transformers wrote it; a multimodal config's ``text_config`` otherwise), as one of
    :data:`DTYPE_NAMES`; None when it declares none that sinklens runs in. On a GPU
    :func:`sinklens.load_model` loads a model in this dtype unless one is given: a 7B checkpoint
    stored in bfloat16 takes 13.5 GB there, not float32's 27 GB."""
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if value is not None:
            return CHECKPOINT_DTYPES.get(str(value).removeprefix("torch."))
    text = config.get("text_config")
    return checkpoint_dtype_name(text) if isinstance(text, Mapping) else None


MAX_MEMORY_EXAMPLE = "0=20GiB,cpu=64GiB"
_MEMORY_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_MEMORY_UNITS |= {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_MEMORY_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_MEMORY_PLACES = ("cpu", "disk", "mps")


def memory_size(value: object, what: str = "a size") -> int:
    """Bytes of ``20GiB``, ``500MB``, ``1.5TiB`` or a plain number of bytes (units in bytes, 1000-
    or 1024-based, in any case), checked."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _MEMORY_SIZE.match(str(value))
        unit = match[2].lower() if match else ""
        if match is None or unit not in _MEMORY_UNITS:
            raise SinklensError(
                f"{what} {value!r} is not a size",
                "write it as a number of bytes with a unit: 20GiB, 500MB, 64GiB",
            )
        size = int(float(match[1]) * _MEMORY_UNITS[unit])
    if size <= 0:
        raise SinklensError(
            f"{what} {value!r} is not a positive size", "give each device some memory, e.g. 20GiB"
        )
    return size


def _memory_place(key: object) -> int | str:
    text = str(key).strip().lower()
    if isinstance(key, int) and not isinstance(key, bool) and key >= 0:
        return key
    if text.removeprefix("cuda:").isdigit():
        return int(text.removeprefix("cuda:"))
    if text in _MEMORY_PLACES:
        return text
    raise SinklensError(
        f"{key!r} is no device accelerate places weights on",
        f"name GPUs by index (0, 1, ...) and the rest cpu or disk, e.g. {MAX_MEMORY_EXAMPLE}",
    )


def parse_max_memory(text: str) -> dict[int | str, int]:
    """``--max-memory``'s text, ``0=20GiB,cpu=64GiB``: the most accelerate's device map may put on
    each device (GPUs by index, ``cpu``, ``disk``), as the dict ``load_model(max_memory=...)`` and
    ``from_pretrained`` take, sizes in bytes. Plain Python: the command line checks it before torch
    is imported."""
    pairs = [part for part in str(text).split(",") if part.strip()]
    if not pairs:
        raise SinklensError(
            f"--max-memory {text!r} names no device",
            f"write DEVICE=SIZE pairs: {MAX_MEMORY_EXAMPLE}",
        )
    found: dict[int | str, int] = {}
    for pair in pairs:
        key, equals, size = pair.partition("=")
        if not equals:
            raise SinklensError(
                f"--max-memory part {pair.strip()!r} is not DEVICE=SIZE",
                f"write DEVICE=SIZE pairs separated by commas: {MAX_MEMORY_EXAMPLE}",
            )
        place = _memory_place(key)
        if place in found:
            raise SinklensError(
                f"--max-memory names {place} twice", f"give each device once: {MAX_MEMORY_EXAMPLE}"
            )
        found[place] = memory_size(size, f"--max-memory size for {place}")
    return found


def check_max_memory(max_memory: str | Mapping | None) -> dict[int | str, int] | None:
    """``max_memory`` as ``load_model`` takes it (the text of :func:`parse_max_memory`, or a dict
    such as ``{0: "20GiB", "cpu": "60GiB"}``), checked, with sizes in bytes; None stays None."""
    if max_memory is None:
        return None
    if isinstance(max_memory, str):
        return parse_max_memory(max_memory)
    if not isinstance(max_memory, Mapping) or not max_memory:
        raise SinklensError(
            f"max_memory {max_memory!r} is neither a dict nor DEVICE=SIZE text",
            f"pass {{0: '20GiB', 'cpu': '64GiB'}} or '{MAX_MEMORY_EXAMPLE}'",
        )
    found: dict[int | str, int] = {}
    for key, size in max_memory.items():
        place = _memory_place(key)
        if place in found:
            raise SinklensError(f"max_memory names {place} twice", "give each device once")
        found[place] = memory_size(size, f"max_memory size for {place}")
    return found


SCAN_BATCH_CPU = 4
"""Tokens per forward pass of the vocabulary scan on a CPU: on SmolLM2 at 1000 repeats on 2 CPU
cores, batches of 1, 4 and 8 gave 0.77, 0.82 and 0.80 tokens/s (``bench/bench_scan.py``)."""
SCAN_BATCH_CUDA = 32
"""Tokens per forward pass of the vocabulary scan on a GPU: on the 7B-shaped model of
``bench/gpu_check.py`` at 1000 repeats on one H200, 248 tokens/s at a batch of 4 and 484 at 32 (the
last release's run of 2026-12-04, which left no record; ``bench/gpu_check.py`` measures both again
and records them)."""


def scan_batch_default(device: str | None) -> int:
    """The scan's tokens per forward pass on ``device`` (``cpu``, ``cuda``, ``cuda:N``, ``auto`` or
    None, as ``--device`` takes it): :data:`SCAN_BATCH_CUDA` on a GPU, :data:`SCAN_BATCH_CPU` on the
    CPU. A named device is answered in plain Python; ``auto`` and None (the first GPU if there is
    one) ask torch whether a GPU is there, so pass the model's device (``str(model.cfg.device)``)
    where torch must stay unimported."""
    name = "" if device is None else str(device).strip().lower()
    if name.startswith("cuda"):
        return SCAN_BATCH_CUDA
    if name in ("", "auto"):
        import torch

        return SCAN_BATCH_CUDA if torch.cuda.is_available() else SCAN_BATCH_CPU
    return SCAN_BATCH_CPU
