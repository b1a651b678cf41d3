"""What fits a device: the layers a model cut short reads (layers on demand), the dtype a model loads in, accelerate's offload (where it puts layers and what
TransformerLens must not see of it), the bytes a checkpoint's weights take, and the one-line error for a GPU
that runs out of memory. :func:`sinklens.load.models.load_model` uses them; nothing here loads a model.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from sinklens._io import cache_dir
from sinklens.errors import SinklensError
from sinklens.load.sources import (
    DTYPE_NAMES,
    SHARD_INDEX,
    ModelSource,
    checkpoint_dtype_name,
    shard_index,
)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}

_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")
_HEAD_PREFIX = "lm_head."


def read_by_layers(key: str, n_layers: int) -> bool:
    """Whether a model built with its first ``n_layers`` layers reads the checkpoint tensor ``key``: not the
    later layers' tensors, nor the head's (it is tied to the embeddings, see :func:`truncate_config`)."""
    match = _LAYER_KEY.search(key)
    return not key.startswith(_HEAD_PREFIX) and (match is None or int(match[1]) < n_layers)


def mixes_offload_with_gpu(places) -> bool:
    """Whether a device map's places put some modules on a GPU (an index or ``cuda...``) and others
    on the CPU or disk: the maps TransformerLens 4.3 refuses to boot (its ``is_mixed_offload_gpu``,
    which a test holds this to)."""
    places = list(places)
    gpu = any(
        isinstance(place, int) or isinstance(place, str) and place.lower().startswith("cuda")
        for place in places
    )
    offload = ("cpu", "disk")
    return gpu and any(isinstance(place, str) and place.lower() in offload for place in places)


@contextmanager
def offload_map_hidden(hf_model) -> Iterator[None]:
    """Hide a device map that mixes GPUs with CPU offload while TransformerLens boots the model.

    TransformerLens 4.3 refuses such a map as unverified, though its components move offloaded weights to
    the GPU for each call (accelerate's ``align_module_device``). accelerate has already placed every
    weight and hooked every offloaded module, so the bridge only needs to know where inputs go (the
    embeddings' device, read from the parameters). The map is put back after the boot; the GPU check
    (``bench/gpu_check.py``) compares such a model's activations with the CPU's."""
    device_map = getattr(hf_model, "hf_device_map", None) or {}
    if not mixes_offload_with_gpu(device_map.values()):
        yield
        return
    del hf_model.hf_device_map
    try:
        yield
    finally:
        hf_model.hf_device_map = device_map


def default_dtype(config, device_map: str) -> torch.dtype:
    """The dtype a model loads in when none is given: float32 on the CPU; on a GPU the dtype its
    checkpoint declares (:func:`~sinklens.load.sources.checkpoint_dtype_name`), float32 where it
    declares none."""
    if device_map == "cpu":
        return torch.float32
    declared = checkpoint_dtype_name(config.to_dict())
    return DTYPES[declared] if declared else torch.float32


def offload_folder(source: ModelSource) -> Path:
    """Where accelerate writes the weights of a device map's ``disk`` part: ``offload/`` in the
    sinklens cache, one folder per model (written only when layers fit neither the GPUs nor the
    CPU)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", source.name.strip("/"))[-120:]
    return cache_dir() / "offload" / name


_MAP_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def offload_note(device_map: Mapping[str, object], folder: str | Path | None = None) -> str | None:
    """One line saying which parts of a model accelerate's device map put on the CPU or on disk
    (None when everything sits on GPUs): layer ranges, then other modules, and what that costs."""
    off: dict[str, list[str]] = {}
    layers: dict[str, list[int]] = {}
    for module, place in device_map.items():
        place = str(place).lower()
        if place not in ("cpu", "disk"):
            continue
        match = _MAP_LAYER.search(module)
        if match:
            layers.setdefault(place, []).append(int(match[1]))
        else:
            off.setdefault(place, []).append(module)
    if not off and not layers:
        return None
    parts = []
    on_disk = f"on disk ({folder})" if folder else "on disk"
    for place, where in (("cpu", "on the CPU"), ("disk", on_disk)):
        named = ([_layer_ranges(layers[place])] if place in layers else []) + off.get(place, [])
        if named:
            listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
            parts.append(f"{listed} {where}")
    return (
        f"accelerate placed {'; '.join(parts)}: their weights move to the GPU for every forward "
        "pass, so runs are slower; --max-memory (max_memory=) sets the split, --dtype bfloat16 "
        "halves what must fit"
    )


def _layer_ranges(indices: list[int]) -> str:
    indices, runs = sorted(set(indices)), list[list[int]]()
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    spans = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return f"layer{'s' if len(indices) > 1 else ''} {','.join(spans)}"


def checkpoint_bytes(
    location: str | Path, dtype: torch.dtype, n_layers: int | None = None
) -> int | None:
    """The bytes a checkpoint's weights take in ``dtype`` (only the first ``n_layers`` layers' and
    the rest, if given), read from its safetensors headers; None where its files are not on this
    machine."""
    folder = Path(location)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    str(location), allow_patterns=["*.safetensors"], local_files_only=True
                )
            )
        except Exception:  # not fetched, or not a hub name: the size stays unknown
            return None
    total = 0
    for path in folder.glob("*.safetensors"):
        try:
            with open(path, "rb") as handle:
                header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        except (OSError, ValueError):
            return None
        for key, entry in header.items():
            if key != "__metadata__" and (n_layers is None or read_by_layers(key, n_layers)):
                numel = 1
                for extent in entry["shape"]:
                    numel *= extent
                total += numel * dtype.itemsize
    return total or None


def _gib(size: int | None) -> str:
    if size is None:
        return "an unknown size"
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def out_of_memory(
    model: torch.nn.Module | None,
    what: str,
    *,
    n_layers: int | None = None,
    dtype: torch.dtype | None = None,
    device: str | None = None,
    weights: int | None = None,
) -> SinklensError:
    """The one-line error for a GPU that ran out of memory while ``what`` (loading, wrapping or
    running a model): the weights' size (``model``'s own, or ``weights`` where it is not built), the
    device's free memory, and the fixes that apply: bfloat16 instead of float32, layers on demand
    where the whole model was built, and accelerate's device map with the CPU taking what does not
    fit."""
    if model is not None:
        hf_model = getattr(model, "original_model", model)
        tensors = [*hf_model.parameters(), *hf_model.buffers()]
        weights = sum(t.numel() * t.element_size() for t in tensors)
        dtype = next(hf_model.parameters()).dtype
        device = getattr(getattr(model, "cfg", None), "device", None)
        device = str(device or next(hf_model.parameters()).device)
        source = getattr(model, "sinklens_source", None)
        source = source or getattr(hf_model, "sinklens_source", None)
        if n_layers is None and source is not None and source.layers_loaded is not None:
            n_layers = source.layers_loaded
    device = device or "cuda"
    free = ""
    if device.startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()
        available, total = torch.cuda.mem_get_info(torch.device(device))
        free = f"; {device} has {_gib(available)} free of {_gib(total)}"
    fixes = []
    if dtype == torch.float32:
        fixes.append(
            "load it in half precision (--dtype bfloat16; dtype='bfloat16'), half the memory"
        )
    if n_layers is None:
        fixes.append(
            "build only the layers a command reads (table, neurons, sink-layer, circuit and scan "
            "do; load_model(n_layers=...))"
        )
    fixes.append(
        "spread it over the GPU and the CPU (--device auto --max-memory 0=20GiB,cpu=64GiB, "
        "with the GPU's share below its free memory)"
    )
    if "forward" in what:
        fixes.append("or run fewer tokens at once (fewer repeats, a smaller --batch-size)")
    dtype_name = str(dtype).removeprefix("torch.")
    return SinklensError(
        f"the GPU ran out of memory while {what}: the model's weights take {_gib(weights)} in "
        f"{dtype_name}{free}",
        "; ".join(fixes),
    )


def text_config(config):
    """The config that holds the decoder's depth (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def truncate_config(config, n_layers: int) -> None:
    """Make ``config`` describe the first ``n_layers`` layers: the depth, and every per-layer list. The head
    is tied to the embeddings: a model cut short has no meaningful logits, and its runs stop before the
    final norm (:func:`sinklens.run.cache.forward`), so its own head need not be read."""
    text = text_config(config)
    depth = text.num_hidden_layers
    for key, value in vars(text).items():
        if isinstance(value, list) and len(value) == depth:
            setattr(text, key, value[:n_layers])
    text.num_hidden_layers = n_layers
    config.tie_word_embeddings = text.tie_word_embeddings = True


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def tensors_read_when_converted(
    location: str | Path, dtype: torch.dtype, device_map, files: ExitStack, n_layers: int | None
) -> dict | None:
    """The checkpoint's tensors, each read from disk only when loading converts it, for a local safetensors
    checkpoint loaded on the CPU in another dtype (a float32 analysis of a bfloat16 checkpoint, say); None
    otherwise, and transformers reads the files itself.

    transformers memory-maps safetensors. Without a conversion that is the cheapest read there is: a tensor
    is read when a run first touches it, and layers never run are never read. A conversion touches every
    tensor, and the mapped pages stay resident next to their converted copies until loading ends (the
    first 4 layers of a 7B-shaped bfloat16 checkpoint loaded in float32: 7.7 GB peak for 4.9 GB of
    weights). Read with ``pread`` instead, each tensor's source bytes are freed once it is converted.
    The handles are entered on ``files``, which must stay open while the model loads. With ``n_layers``, only
    the tensors a model of that many layers is built from are offered (:func:`~sinklens.load.device_memory.read_by_layers`)."""
    from safetensors import safe_open

    folder = Path(location)
    if device_map != "cpu" or not folder.is_dir():
        return None
    index = shard_index(folder / SHARD_INDEX)
    names = (
        sorted(set(index["weight_map"].values()))
        if index is not None
        else [path.name for path in folder.glob("*.safetensors")]
    )
    handles = [
        files.enter_context(safe_open(folder / name, framework="pt", device="cpu", backend="pread"))
        for name in names
    ]
    reads = {
        key: handle.get_slice(key)
        for handle in handles
        for key in handle.keys()
        if n_layers is None or read_by_layers(key, n_layers)
    }
    target = _SAFETENSORS_DTYPES.get(dtype)
    floating = {read.get_dtype() for read in reads.values()} & set(_SAFETENSORS_DTYPES.values())
    return reads if reads and floating - {target} else None
