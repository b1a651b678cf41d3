"""Defaults that fit a researcher's GPU, tested on the CPU: the checkpoint's own dtype on CUDA,
``max_memory`` as text or a dict, the scan's batch by device, a GPU out of memory as one line, CPU
and disk offload said in one logged line with a folder for the disk, and the contract with
TransformerLens that lets a GPU+CPU map boot.

The machine's GPUs are played by ``torch.cuda`` (monkeypatched) where a test needs them;
tests/test_gpu.py runs the same paths on a real one."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys

import pytest
import torch

import sinklens as sl
from sinklens.load import device_memory
from sinklens.load.device_memory import offload_note, out_of_memory
from sinklens.load.models import load_model, placement
from sinklens.load.sources import (
    SCAN_BATCH_CPU,
    SCAN_BATCH_CUDA,
    check_max_memory,
    checkpoint_dtype_name,
    parse_max_memory,
    scan_batch_default,
)
from sinklens.run.cache import run_cache


def test_the_torch_free_helpers_stay_torch_free():
    """The command line checks ``--max-memory`` and picks the scan's batch before torch is
    imported."""
    code = (
        "import sys; from sinklens.load.sources import parse_max_memory, scan_batch_default; "
        "parse_max_memory('0=20GiB,cpu=64GiB'); scan_batch_default('cuda:0'); "
        "scan_batch_default('cpu'); "
        "print('torch' in sys.modules)"
    )
    assert (
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        == "False\n"
    )


def test_max_memory_text_is_the_dict_accelerate_takes():
    assert parse_max_memory("0=20GiB,cpu=64GiB") == {0: 20 * 2**30, "cpu": 64 * 2**30}
    assert parse_max_memory(" cuda:1 = 1.5GB , disk=1TiB ") == {1: 1_500_000_000, "disk": 2**40}
    assert parse_max_memory("0=1000") == {0: 1000}
    assert check_max_memory({0: "1GiB", "cpu": 8 * 2**30}) == {0: 2**30, "cpu": 8 * 2**30}
    assert check_max_memory("0=1MiB") == {0: 2**20} and check_max_memory(None) is None


@pytest.mark.parametrize(
    "text, problem",
    [
        ("", "names no device"),
        ("0", "is not DEVICE=SIZE"),
        ("gpu=1GB", "'gpu' is no device accelerate places weights on"),
        ("0=1GB,0=2GB", "names 0 twice"),
        ("0=lots", "'lots' is not a size"),
        ("0=0GB", "is not a positive size"),
    ],
)
def test_bad_max_memory_text_is_one_line_with_its_fix(text, problem):
    with pytest.raises(sl.SinklensError, match=problem) as info:
        parse_max_memory(text)
    assert "Fix:" in str(info.value) and "\n" not in str(info.value)


def test_max_memory_needs_the_auto_device(tiny_dir):
    with pytest.raises(
        sl.SinklensError, match="max_memory caps accelerate's device map, but the device is cpu"
    ):
        load_model(str(tiny_dir), device="cpu", max_memory="cpu=8GiB")


def test_the_scans_batch_is_chosen_by_device(monkeypatch):
    assert scan_batch_default("cuda") == scan_batch_default("cuda:1") == SCAN_BATCH_CUDA == 32
    assert scan_batch_default("cpu") == SCAN_BATCH_CPU == 4
    for gpus, expected in ((True, SCAN_BATCH_CUDA), (False, SCAN_BATCH_CPU)):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpus=gpus: gpus)
        assert scan_batch_default(None) == scan_batch_default("auto") == expected


def test_a_checkpoint_declares_its_dtype():
    assert checkpoint_dtype_name({"dtype": "bfloat16"}) == "bfloat16"
    assert checkpoint_dtype_name({"torch_dtype": "float16"}) == "float16"
    assert checkpoint_dtype_name({"text_config": {"dtype": "bfloat16"}}) == "bfloat16"
    assert checkpoint_dtype_name({"dtype": "float64"}) is None and checkpoint_dtype_name({}) is None


def _declaring(tiny_dir, tmp_path, dtype: str | None):
    """A copy of the tiny checkpoint whose config declares ``dtype`` (None: declares none)."""
    folder = tmp_path / f"declares-{dtype}"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config.pop("dtype", None)
    if dtype is not None:
        config["dtype"] = dtype
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _one_gpu(monkeypatch, device_map: dict | None = None) -> dict:
    """Play one GPU: ``auto`` then asks transformers for accelerate's device map; the model is
    loaded on the CPU all the same (with ``device_map`` set on it as accelerate's placement, if
    given). Returns what was asked."""
    from transformers import AutoModelForCausalLM

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    asked = {}
    load = AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        asked.update(kwargs)
        model = load(
            *args, **{**kwargs, "device_map": "cpu", "max_memory": None, "offload_folder": None}
        )
        if device_map is not None:
            model.hf_device_map = device_map
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", recording)
    return asked


@pytest.mark.parametrize(
    "declared, expected", [("bfloat16", "bfloat16"), ("float16", "float16"), (None, "float32")]
)
def test_on_a_gpu_a_model_loads_in_its_checkpoints_dtype_unless_one_is_given(
    tiny_dir, tmp_path, monkeypatch, declared, expected
):
    folder = _declaring(tiny_dir, tmp_path, declared)
    assert (
        placement(load_model(str(folder), device="cpu"))["dtype"] == "float32"
    )  # the CPU: float32, as before
    asked = _one_gpu(monkeypatch)
    model = load_model(str(folder), device="auto")
    assert asked["dtype"] == getattr(torch, expected) and placement(model)["dtype"] == expected
    load_model(str(folder), device="auto", dtype="float32")
    assert asked["dtype"] == torch.float32  # a dtype given is a dtype kept


def test_auto_gets_an_offload_folder_in_the_cache_and_says_where_layers_went(
    tiny_dir, tmp_path, monkeypatch, caplog
):
    monkeypatch.setenv("SINKLENS_CACHE", str(tmp_path / "cache"))
    placed = {
        "model.embed_tokens": 0,
        "model.rotary_emb": 0,
        "model.layers.0": 0,
        "model.layers.1": 0,
        "model.layers.2": "cpu",
        "model.layers.3": "cpu",
        "model.layers.4": "disk",
        "model.layers.5": "disk",
        "model.norm": "disk",
        "lm_head": "disk",
    }
    asked = _one_gpu(monkeypatch, placed)
    with caplog.at_level(logging.INFO, logger="sinklens"):
        model = load_model(str(tiny_dir), device="auto", max_memory="0=1MiB,cpu=2MiB")
    folder = asked["offload_folder"]
    assert folder.startswith(str(tmp_path / "cache" / "offload"))
    assert asked["max_memory"] == {0: 2**20, "cpu": 2 * 2**20}
    notes = [
        r.getMessage() for r in caplog.records if r.name == "sinklens" and r.levelno == logging.INFO
    ]
    assert notes == [
        "accelerate placed layers 2-3 on the CPU; layers 4-5, model.norm and lm_head on disk "
        f"({folder}): "
        "their weights move to the GPU for every forward pass, so runs are slower; --max-memory "
        "(max_memory=) sets the split, --dtype bfloat16 halves what must fit"
    ]
    # TransformerLens booted the model although its map mixes the GPU with offload, and the map is
    # back
    assert (
        model.original_model.hf_device_map == placed and placement(model)["device"] == "0,cpu,disk"
    )


def test_a_map_on_gpus_alone_says_nothing():
    assert offload_note({"model.embed_tokens": 0, "model.layers.0": 1, "lm_head": "cuda:1"}) is None
    assert offload_note({"model.layers.7": "cpu"}) == (
        "accelerate placed layer 7 on the CPU: their weights move to "
        "the GPU for every forward pass, so runs are slower; "
        "--max-memory (max_memory=) sets the split, --dtype bfloat16 "
        "halves what must fit"
    )


# --- the contract with TransformerLens that _offload_map_hidden relies on
# ---------------------------------------


MAPS = [
    {"model.embed_tokens": 0, "model.layers.0": "cpu"},
    {"model.embed_tokens": "cuda:0", "model.layers.0": "disk"},
    {"model.embed_tokens": 0, "model.layers.0": 1},
    {"model.embed_tokens": "cpu", "model.layers.0": "disk"},
    {"model.embed_tokens": "cpu"},
    {"model.embed_tokens": "meta", "model.layers.0": "cpu"},
]


@pytest.mark.parametrize("device_map", MAPS)
def test_the_maps_sinklens_hides_are_the_maps_transformerlens_refuses(device_map):
    """If TransformerLens changes which maps it refuses, this fails: revisit
    ``_offload_map_hidden``."""
    from transformer_lens.utilities.multi_gpu import is_mixed_offload_gpu

    assert device_memory.mixes_offload_with_gpu(device_map.values()) == is_mixed_offload_gpu(
        device_map.values()
    )


def _booting(tiny_dir, device_map):
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    hf_model.hf_device_map = dict(device_map)

    def boot():
        return TransformerBridge.boot_transformers(
            str(tiny_dir),
            hf_model=hf_model,
            tokenizer=AutoTokenizer.from_pretrained(tiny_dir),
            dtype=torch.float32,
            device="cpu",
        )

    return hf_model, boot


def test_transformerlens_refuses_a_gpu_and_cpu_map_and_boots_it_hidden(tiny_dir):
    """TransformerLens 4.3 refuses to boot a model whose device map mixes a GPU with CPU offload
    (unverified, it says); sinklens hides the map while it boots, then puts it back. When
    TransformerLens stops refusing, the first half fails: the workaround can go."""
    mixed = {"model.embed_tokens": 0, "model.layers.0": 0, "model.layers.1": "cpu"}
    hf_model, boot = _booting(tiny_dir, mixed)
    with pytest.raises(ValueError, match="mixes CPU/disk offload targets with a GPU target"):
        boot()
    with device_memory.offload_map_hidden(hf_model):
        assert not hasattr(hf_model, "hf_device_map")
        bridge = boot()
    assert hf_model.hf_device_map == mixed and bridge.cfg.device == "cpu"
    with pytest.raises(RuntimeError, match="inside"), device_memory.offload_map_hidden(hf_model):
        raise RuntimeError("inside")
    assert hf_model.hf_device_map == mixed  # put back after an error too


def test_a_map_transformerlens_accepts_is_left_in_place(tiny_dir):
    on_cpu = {"model.embed_tokens": "cpu", "model.layers.0": "cpu"}
    hf_model, boot = _booting(tiny_dir, on_cpu)
    with device_memory.offload_map_hidden(hf_model):
        assert hf_model.hf_device_map == on_cpu
        boot()


# --- a GPU out of memory: one line
# ------------------------------------------------------------------------------


def _gpu_memory(monkeypatch, free: int = 3 * 2**30, total: int = 80 * 2**30) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))


def test_running_out_of_gpu_memory_while_loading_is_one_line(tiny_dir, monkeypatch):
    from transformers import AutoModelForCausalLM

    def out_of_memory_(*args, **kwargs):
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 86.00 MiB. GPU 0 has a total capacity ..."
        )

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory_)
    with pytest.raises(sl.SinklensError) as info:
        load_model(str(tiny_dir), device="cpu", dtype="float32")
    message = str(info.value)
    size = device_memory.checkpoint_bytes(tiny_dir, torch.float32)
    assert "\n" not in message and size > 0
    assert message.startswith(
        f"the GPU ran out of memory while loading it: the model's weights take "
        f"{size / 2**20:.1f} MiB in float32. Fix: "
    )
    assert (
        "--dtype bfloat16" in message and "--device auto --max-memory 0=20GiB,cpu=64GiB" in message
    )
    assert "build only the layers a command reads" in message


def test_running_out_of_gpu_memory_in_a_forward_pass_is_one_line(tiny_dir, monkeypatch):
    model = load_model(str(tiny_dir), device="cpu", n_layers=3)

    def out_of_memory_(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(model, "forward", out_of_memory_)
    monkeypatch.setattr(model, "run_with_hooks", out_of_memory_)
    with pytest.raises(sl.SinklensError) as info:
        run_cache(model, torch.tensor([[1, 2, 3, 4]]), ["blocks.1.hook_resid_post"])
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        "the GPU ran out of memory while running a forward pass of 1 x 4 tokens: the model's "
        "weights take "
    )
    assert "--dtype bfloat16" in message and "fewer repeats, a smaller --batch-size" in message
    assert "build only the layers" not in message  # it was built with its first layers only already


def test_the_out_of_memory_line_names_the_gpus_free_memory(monkeypatch):
    _gpu_memory(monkeypatch)
    message = str(
        out_of_memory(None, "loading it", dtype=torch.bfloat16, device="cuda:0", weights=14 * 2**30)
    )
    assert message == (
        "the GPU ran out of memory while loading it: the model's weights take 14.0 GiB in "
        "bfloat16; "
        "cuda:0 has 3.0 GiB free of 80.0 GiB. Fix: build only the layers a command reads (table, "
        "neurons, sink-layer, circuit and scan do; load_model(n_layers=...)); spread it over the "
        "GPU and "
        "the CPU (--device auto --max-memory 0=20GiB,cpu=64GiB, with the GPU's share below its "
        "free "
        "memory)"
    )
