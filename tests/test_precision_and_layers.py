"""Precision, devices and layers on demand: the keywords every command takes, checked before any work,
and truncated loads that give the whole model's activations on the layers they build."""

from __future__ import annotations

import json

import pytest
import torch

import sinklens as sl
from conftest import arch_config, build_tokenizer, save_arch
from sinklens.cli import main
from sinklens.load.models import placement

DEPTH, KEPT = 5, 2


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def checkpoint(request, tmp_path_factory):
    return save_arch(tmp_path_factory.mktemp(request.param), request.param, DEPTH)


NAMES = [
    f"blocks.{layer}.{hook}"
    for layer in range(KEPT)
    for hook in ("hook_resid_post", "hook_mlp_out", "mlp.hook_post", "attn.hook_pattern")
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_truncated_load_gives_the_whole_models_activations_on_its_layers(checkpoint, dtype):
    whole = sl.load_model(str(checkpoint), device="cpu", dtype=dtype)
    early = sl.load_model(str(checkpoint), device="cpu", dtype=dtype, n_layers=KEPT)
    assert (whole.cfg.n_layers, early.cfg.n_layers, len(early.original_model.model.layers)) == (
        DEPTH,
        KEPT,
        KEPT,
    )
    tokens = torch.randint(
        3, whole.cfg.d_vocab, (2, 20), generator=torch.Generator().manual_seed(0)
    )
    full, truncated = (sl.run_cache(m, tokens, NAMES) for m in (whole, early))
    for name in NAMES:
        assert torch.equal(full[name], truncated[name]), name
    assert placement(early) == {
        "dtype": dtype,
        "device": "cpu",
        "layers_loaded": f"0..{KEPT - 1} of {DEPTH}",
    }
    assert placement(whole) == {"dtype": dtype, "device": "cpu"}
    assert (
        sl.load_model(str(checkpoint), device="cpu", n_layers=DEPTH + 3).cfg.n_layers == DEPTH
    )  # all there is


@pytest.mark.parametrize("n_layers", [None, KEPT])
def test_a_converting_load_holds_what_transformers_loads(checkpoint, tmp_path, n_layers):
    """Loading converts a checkpoint stored in another dtype tensor by tensor as it reads it (so the source
    bytes never pile up): every weight and buffer is what transformers' own load in that dtype holds."""
    from transformers import AutoModelForCausalLM

    stored = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).save_pretrained(stored)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (stored / name).write_bytes((checkpoint / name).read_bytes())
    reference = AutoModelForCausalLM.from_pretrained(stored, dtype=torch.float32)
    loaded = sl.load_model(
        str(stored), device="cpu", dtype="float32", n_layers=n_layers
    ).original_model
    expected = dict(reference.named_parameters()) | dict(reference.named_buffers())
    held = {
        name.replace("._original_component", ""): tensor  # the bridge wraps each module it hooks
        for name, tensor in [*loaded.named_parameters(), *loaded.named_buffers()]
    }
    kept = {
        name
        for name in expected
        if not any(f".layers.{layer}." in name for layer in range(n_layers or DEPTH, DEPTH))
    }
    if (
        n_layers is not None
    ):  # a model cut short never runs its head: tied to the embeddings, it is not read
        kept.discard("lm_head.weight")
        assert loaded.lm_head.weight.data_ptr() == loaded.get_input_embeddings().weight.data_ptr()
    assert kept <= set(held)
    for name in kept:
        assert held[name].dtype == expected[name].dtype and torch.equal(
            held[name], expected[name]
        ), name


def test_bad_precision_or_device_is_one_clear_line_before_loading(tiny_dir, capsys, monkeypatch):
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    cases = [
        (["table", "--dtype", "float8"], "invalid choice: 'float8'"),
        (["table", "--device", "cuda"], "device cuda asked for, but this machine has no CUDA GPU"),
        (["scan", "--device", "cuda:1"], "no CUDA GPU"),
        (
            ["neurons", "--device", "tpu"],
            "unknown device 'tpu'. Fix: pass cpu, cuda, cuda:N or auto",
        ),
        (["evaluate", "--patch", "p.json", "--device", "gpu"], "unknown device 'gpu'"),
    ]
    for args, message in cases:
        assert main([*args, "--model", str(tiny_dir)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("sinklens: error:") and message in err[0], (
            args,
            err,
        )
    with pytest.raises(
        sl.SinklensError, match="unknown dtype 'int8'. Fix: pass one of float32, bfloat16, float16"
    ):
        sl.load_model(str(tiny_dir), dtype="int8")
    with pytest.raises(sl.SinklensError, match="n_layers=0 builds no layer"):
        sl.load_model(str(tiny_dir), n_layers=0)


@pytest.mark.parametrize("gpus", [0, 2])
def test_auto_hands_accelerate_every_gpu_and_is_the_cpu_without_one(tiny_dir, monkeypatch, gpus):
    """What ``auto`` asks transformers for, with the machine's GPUs played by torch.cuda: accelerate's device map
    (with the caps of ``max_memory``) where there are GPUs, the CPU where there is none. The model is then loaded
    on the CPU either way, as this machine has no GPU; tests/test_gpu.py loads it on real ones."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    asked = {}
    load = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        asked.update(kwargs)
        return load(*args, **{**kwargs, "device_map": "cpu", "max_memory": None})

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    caps = {0: "1GiB", 1: "1GiB", "cpu": "8GiB"} if gpus else None
    model = sl.load_model(str(tiny_dir), device="auto", max_memory=caps)
    in_bytes = {0: 2**30, 1: 2**30, "cpu": 8 * 2**30}  # checked and read as accelerate reads them
    expected = ("auto", in_bytes) if gpus else ("cpu", None)
    assert (asked["device_map"], asked["max_memory"]) == expected
    assert placement(model)["device"] == "cpu"
    with pytest.raises(
        sl.SinklensError, match="max_memory caps accelerate's device map, but the device is cpu"
    ):
        sl.load_model(str(tiny_dir), device="cpu", max_memory={"cpu": "8GiB"})


@pytest.mark.parametrize(
    "command", [["table", "--n-repeats", "20"], ["neurons"], ["circuit", "--n-repeats", "20"]]
)
def test_early_layer_commands_build_only_their_layers_and_find_the_same(
    command, tiny_dir, long_corpus_file, capsys, monkeypatch
):
    from sinklens.settings import Settings

    args = [
        *command,
        "--model",
        str(tiny_dir),
        "--corpus",
        str(long_corpus_file),
        "--corpus-chars",
        "400",
        "--max-layer",
        "4",
        "--json",
    ]
    built = []
    real = sl.load_model

    def recording(*a, **k):
        model = real(*a, **k)
        built.append(model.cfg.n_layers)
        return model

    monkeypatch.setattr("sinklens.load.models.load_model", recording)
    assert main(args) == 0
    early = capsys.readouterr().out
    load = Settings.load_model
    monkeypatch.setattr(
        Settings, "load_model", lambda self, verbose=False, **_: load(self, verbose)
    )
    assert main(args) == 0
    whole = capsys.readouterr().out
    assert built == [4, 6] and early.replace('"layers_loaded": "0..3 of 6", ', "") == whole


def test_a_checkpoint_whose_index_names_a_missing_shard_is_one_line_before_loading(
    tmp_path, capsys, monkeypatch
):
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    AutoModelForCausalLM.from_config(arch_config("llama", tokenizer, DEPTH)).save_pretrained(
        tmp_path, max_shard_size="20KB"
    )
    tokenizer.save_pretrained(tmp_path)
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2
    shards[1].unlink()
    capsys.readouterr()  # the save's progress bars
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    assert main(["table", "--model", str(tmp_path)]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert (
        len(err) == 1
        and "is incomplete: its index model.safetensors.index.json names 1 missing shard(s), "
        f"{shards[1].name}. Fix: copy or download"
        in err[0]
    ), err


def test_every_command_runs_in_bfloat16_and_finds_what_float32_finds(
    tiny_dir, long_corpus_file, tmp_path, capsys
):
    study = ["--model", str(tiny_dir), "--corpus", str(long_corpus_file), "--corpus-chars", "400"]
    tables = {}
    for dtype in ("float32", "bfloat16"):
        assert main(["table", *study, "--n-repeats", "20", "--dtype", dtype, "--json"]) == 0
        tables[dtype] = json.loads(capsys.readouterr().out)
    full, half = tables["float32"], tables["bfloat16"]
    assert half["dtype"] == "bfloat16" and full["dtype"] == "float32"
    for key in ("sink_layer", "sink_neurons", "repeats_to_sink"):
        assert half[key] == full[key], key
    assert half["first_token"]["id"] == full["first_token"]["id"]
    assert half["first_token_norm"] == pytest.approx(full["first_token_norm"], rel=0.01)
    bf16 = ["--dtype", "bfloat16"]
    assert (
        main(
            [
                "report",
                *study,
                *bf16,
                "--words",
                "the",
                "--n-repeats",
                "20",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "r" / "results.json").read_text())["model"]["dtype"] == "bfloat16"
    for command in (
        ["neurons", "--json"],
        ["sink-layer"],
        ["circuit", "--n-repeats", "20", "--json"],
        ["patch", "--n-repeats", "20", "--out", str(tmp_path / "p.json"), "--json"],
        [
            "scan",
            "--n-repeats",
            "20",
            "--tokens",
            "60",
            "--screen-repeats",
            "4",
            "--out",
            str(tmp_path / "s"),
            "--json",
        ],
        [
            "attack",
            "--scan",
            str(tmp_path / "s"),
            "--lengths",
            "8",
            "--sequences",
            "4",
            "--patch",
            str(tmp_path / "p.json"),
            "--json",
        ],
    ):
        assert main([*command, *study, *bf16]) == 0, command
    assert json.loads((tmp_path / "s" / "scan.json").read_text())["dtype"] == "bfloat16"


def test_a_hub_checkpoint_is_fetched_only_for_the_layers_built(tmp_path, monkeypatch):
    """The hub is played by a local sharded checkpoint: a truncated load asks it for the shards it needs only."""
    import fnmatch
    import shutil

    import huggingface_hub
    from transformers import AutoModelForCausalLM

    hub = tmp_path / "hub"
    tokenizer = build_tokenizer()
    AutoModelForCausalLM.from_config(arch_config("llama", tokenizer, DEPTH)).save_pretrained(
        hub, max_shard_size="20KB"
    )
    tokenizer.save_pretrained(hub)
    fetched = []

    def hf_hub_download(repo, filename, **_):
        fetched.append(filename)
        return str(hub / filename)

    def snapshot_download(repo, allow_patterns, **_):
        folder = tmp_path / "snapshot"
        folder.mkdir(exist_ok=True)
        for path in hub.iterdir():
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in allow_patterns):
                fetched.append(path.name)
                shutil.copy(path, folder / path.name)
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("SINKLENS_CACHE", str(tmp_path / "cache"))
    early = sl.load_model("someone/tiny-llama", device="cpu", n_layers=KEPT)
    index = json.loads((hub / "model.safetensors.index.json").read_text())["weight_map"]
    needed = {
        shard
        for key, shard in index.items()  # the embeddings, the final norm and the layers built; no head
        if not key.startswith("lm_head.")
        and (".layers." not in key or int(key.split(".")[2]) < KEPT)
    }
    shards = {name for name in fetched if name.endswith(".safetensors")}
    assert shards == needed and len(needed) < len(set(index.values()))
    whole = sl.load_model(str(hub), device="cpu")
    tokens = torch.randint(
        3, whole.cfg.d_vocab, (1, 12), generator=torch.Generator().manual_seed(0)
    )
    names = [f"blocks.{KEPT - 1}.hook_resid_post"]
    assert torch.equal(
        sl.run_cache(early, tokens, names)[names[0]], sl.run_cache(whole, tokens, names)[names[0]]
    )
