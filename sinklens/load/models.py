"""One way to get a ready ``TransformerBridge``: from an alias, a GGUF file, a local HF directory or a hub name.

Every path ends in the same place: a Hugging Face model and tokenizer, handed to
``TransformerBridge.boot_transformers(..., hf_model=...)`` in eval mode with raw (HF-exact)
numerics, and attention fused wherever no hook reads its internals (:mod:`sinklens.load.fused_attention`).
GGUF files are dequantised once and cached as safetensors, so a second load takes seconds. The first fetch and conversion are announced on the ``sinklens`` logger (the
command line prints them); the transformers library's own progress bars and notices stay hidden
unless ``verbose=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import atomic_dir, cache_dir, sha256_file
from sinklens.errors import SinklensError
from sinklens.load.assets import fetch_asset
from sinklens.load.fused_attention import use_fused_attention
from sinklens.load.registry import DEFAULT_MODEL, MODEL_ALIASES
from sinklens.load.sources import (
    DTYPE_NAMES,
    SHARD_INDEX,
    ModelSource,
    aliases,
    check_device,
    check_dtype_name,
    check_max_memory,
    checkpoint_dtype_name,
    resolve_model,
    shard_index,
)

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}
log = logging.getLogger("sinklens")


def as_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """``torch.float32`` or a name (``float32``, ``bfloat16``, ``float16``), checked."""
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    return DTYPES[check_dtype_name(dtype)]


def as_device(device: str | torch.device | None) -> str:
    """Where a model goes: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (every GPU, split by accelerate's device
    map when there are several; the CPU when there is none), checked before anything is loaded. None: the
    first GPU when there is one, else the CPU."""
    checked = check_device(device)
    if checked is None:
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return checked


def placement(model: torch.nn.Module) -> dict[str, str]:
    """The dtype and device(s) a loaded model runs in, as results record them."""
    hf_model = getattr(model, "original_model", model)
    device_map = getattr(hf_model, "hf_device_map", None) or {}
    devices = sorted({str(d) for d in device_map.values()}) or [str(next(model.parameters()).device)]
    dtype = next(model.parameters()).dtype
    record = {"dtype": str(dtype).removeprefix("torch."), "device": ",".join(devices)}
    source = getattr(model, "sinklens_source", None)
    if source is not None and source.layers_loaded is not None:
        record["layers_loaded"] = f"0..{source.layers_loaded - 1} of {source.n_layers}"
    return record


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    n_ctx: int | None = None,
    n_layers: int | None = None,
    max_memory: str | Mapping[int | str, int | str] | None = None,
    verbose: bool = False,
) -> TransformerBridge:
    """Load ``spec`` as an eval-mode ``TransformerBridge``.

    ``n_layers`` builds only the first ``n_layers`` layers (with the embeddings and the final norm): only
    their tensors are read, converted and moved, so an early-layer analysis of a 70B checkpoint reads a
    few GB. The activations of layers ``0..n_layers-1`` are those of the whole model; the logits mean
    nothing (the head is tied to the embeddings and never read, and runs stop after the last layer
    built). Default: every layer. A checkpoint stored in another dtype is converted tensor by tensor as
    it is read, so its source bytes never pile up beside the converted weights.

    ``dtype`` is the weights' and activations' precision (``float32``, ``bfloat16`` or ``float16``; the
    analyses compute norms, statistics and thresholds in float32 whatever it is). None: float32 on the CPU, and
    on a GPU the dtype the checkpoint declares (its ``config.json``; float32 where it declares none), so a 7B
    checkpoint stored in bfloat16 takes 13.5 GB of GPU memory rather than 27. ``device`` is ``cpu``,
    ``cuda``, ``cuda:N`` or ``auto`` (see :func:`as_device`; default: the first GPU, else the CPU). With
    ``auto``, ``max_memory`` caps what accelerate's device map puts on each device (``{0: "20GiB", "cpu":
    "60GiB"}``, as ``from_pretrained`` takes it, or the command line's text ``"0=20GiB,cpu=60GiB"``, see
    :func:`~sinklens.load.sources.parse_max_memory`); layers that do not fit the GPUs are offloaded to the CPU
    and run on the GPU, their weights moved there for each forward pass, and what does not fit the CPU either
    to disk, in the sinklens cache (``offload/``). Where accelerate puts layers off the GPU, one line on the
    ``sinklens`` logger says which and where. A GPU that runs out of memory while loading is one
    :class:`~sinklens.errors.SinklensError` naming the model's size, the free memory and the fixes.

    Attention runs fused (SDPA) on every layer whose attention internals no hook reads, and step by
    step as TransformerLens implements it where one does (see :mod:`sinklens.load.fused_attention`).

    ``spec`` is a built-in alias (``smollm2-135m-instruct``, the default, or ``gemma-3-270m``), a
    ``.gguf`` file, a local Hugging Face directory, or a hub name. The bridge gets a
    ``sinklens_source`` attribute (a :class:`ModelSource`) that results record. ``verbose`` shows
    the transformers library's progress bars and notices.
    """
    dtype, device = None if dtype is None else as_dtype(dtype), as_device(device)
    if n_layers is not None and n_layers < 1:
        raise SinklensError(f"n_layers={n_layers} builds no layer", "pass at least 1, or None for the whole model")
    max_memory = _check_max_memory(device, max_memory)
    with _libraries_quiet(not verbose):
        return _load(spec, dtype, device, n_ctx, n_layers, max_memory)


def _check_max_memory(device: str, max_memory) -> dict[int | str, int] | None:
    max_memory = check_max_memory(max_memory)
    if max_memory is not None and device != "auto":
        raise SinklensError(f"max_memory caps accelerate's device map, but the device is {device}",
                            "pass device='auto' with it (--device auto), or drop max_memory")
    return max_memory


@contextmanager
def _libraries_quiet(quiet: bool) -> Iterator[None]:
    """Hide transformers' and huggingface_hub's progress bars and notices for the duration."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import (
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )
    from transformers import modeling_gguf_pytorch_utils as gguf_reader
    from transformers.utils import logging as hf_logging

    bars_on, hub_bars_off, level = hf_logging.is_progress_bar_enabled(), are_progress_bars_disabled(), hf_logging.get_verbosity()
    gguf_bar = gguf_reader.tqdm  # the GGUF reader's bar ignores transformers' own switch
    hf_logging.disable_progress_bar()
    disable_progress_bars()
    hf_logging.set_verbosity_error()
    gguf_reader.tqdm = functools.partial(gguf_bar, disable=True)
    try:
        yield
    finally:
        gguf_reader.tqdm = gguf_bar
        hf_logging.set_verbosity(level)
        if bars_on:
            hf_logging.enable_progress_bar()
        if not hub_bars_off:
            enable_progress_bars()


def load_hf_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    max_memory: str | Mapping[int | str, int | str] | None = None,
    verbose: bool = False,
):
    """The model of :func:`load_model` as a plain Hugging Face causal LM and its tokenizer, without
    TransformerLens: for ``generate``, lm-evaluation-harness or a server, with a
    :class:`~sinklens.run.sink_patch.SinkPatch` installed as forward hooks. Same specs, same cache, same
    ``dtype``, ``device`` and ``max_memory`` keywords."""
    dtype, device = None if dtype is None else as_dtype(dtype), as_device(device)
    max_memory = _check_max_memory(device, max_memory)
    with _libraries_quiet(not verbose):
        hf_model, tokenizer, source = _hf_pair(spec, dtype, device, None, max_memory)
    hf_model.sinklens_source = source
    return hf_model, tokenizer


def _hf_pair(spec: str, dtype: torch.dtype | None, device: str, n_layers: int | None, max_memory=None):
    source = resolve_model(spec)
    if source.kind == "alias":
        location = alias_weights(spec)
    elif source.kind == "gguf":
        gguf = Path(source.name)
        location = _converted_gguf(lambda: gguf, f"{gguf.stem}-{sha256_file(gguf)[:16]}")
    elif source.kind == "hub" and n_layers is not None:
        location = _hub_early_layers(source.spec, n_layers) or source.name
    else:
        location = source.name
    hf_model, tokenizer, depth = _load_hf(location, source, dtype, device, n_layers, max_memory)
    loaded = hf_model.config.num_hidden_layers
    source = dataclasses.replace(source, bos_token_id=tokenizer.bos_token_id, n_layers=depth,
                                 layers_loaded=loaded if loaded < depth else None)
    return hf_model, tokenizer, source


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now: huggingface_hub reads it once at import, and honouring it at call time
    too gives an offline user the error at once instead of after the hub's connection retries."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


_LAYER_KEY = re.compile(r"\.layers\.(\d+)\.")
_HEAD_PREFIX = "lm_head."


def _built(key: str, n_layers: int) -> bool:
    """Whether a model built with its first ``n_layers`` layers reads the checkpoint tensor ``key``: not the
    later layers' tensors, nor the head's (it is tied to the embeddings, see :func:`_truncate`)."""
    match = _LAYER_KEY.search(key)
    return not key.startswith(_HEAD_PREFIX) and (match is None or int(match[1]) < n_layers)
_HUB_SIDE_FILES = ("*.json", "*.model", "*.txt", "*.tiktoken", "*.py")  # config, tokenizer, generation settings


def _hub_early_layers(repo: str, n_layers: int) -> Path | None:
    """A local view of a sharded hub checkpoint holding only what layers ``0..n_layers-1`` need: the shards with
    the embeddings, those layers and the final norm are downloaded, the others never are, and the
    view's index names only the tensors kept. None for a checkpoint in one file (it is fetched whole)."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError

    offline = _offline()
    try:
        index_file = Path(hf_hub_download(repo, SHARD_INDEX, local_files_only=offline))
    except EntryNotFoundError:  # a checkpoint in one file (or, offline, an index never fetched)
        return None
    except OSError:  # no network, no such model, no access: the ordinary load says so in one line
        return None
    index = shard_index(index_file, fix=f"delete {index_file.parent} from the hub cache to fetch it again")
    weight_map = index["weight_map"]
    kept = {key: shard for key, shard in weight_map.items() if _built(key, n_layers)}
    folder = Path(snapshot_download(repo, allow_patterns=[*sorted(set(kept.values())), *_HUB_SIDE_FILES],
                                    local_files_only=offline))
    view = cache_dir() / "hub-views" / f"{repo.replace('/', '--')}-layers-{n_layers}"
    with atomic_dir(view) as tmp:
        for path in folder.iterdir():
            if path.name != SHARD_INDEX:
                (tmp / path.name).symlink_to(path.resolve())
        (tmp / SHARD_INDEX).write_text(json.dumps({**index, "weight_map": kept}), encoding="utf-8")
    return view


def _load(spec: str, dtype: torch.dtype | None, device: str, n_ctx: int | None, n_layers: int | None,
          max_memory=None) -> TransformerBridge:
    hf_model, tokenizer, source = _hf_pair(spec, dtype, device, n_layers, max_memory)
    dtype = hf_model.sinklens_dtype
    device = hf_model.device  # with a device map: where the embeddings are
    try:
        with _offload_map_hidden(hf_model):
            bridge = TransformerBridge.boot_transformers(
                source.name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device, n_ctx=n_ctx
            )
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(hf_model, "TransformerLens wrapped it", n_layers=n_layers) from exc
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise SinklensError(
            f"TransformerLens cannot wrap {source.name} ({type(hf_model).__name__}): {_first_line(exc)}",
            "use a causal LM architecture that TransformerLens 4.3 supports (Llama, Gemma, Mistral, Qwen, GPT-2, ...)",
        ) from exc
    bridge.eval()
    use_fused_attention(bridge)
    bridge.sinklens_source = source
    return bridge


def mixes_offload_with_gpu(places) -> bool:
    """Whether a device map's places put some modules on a GPU (an index or ``cuda...``) and others on the CPU
    or disk: the maps TransformerLens 4.3 refuses to boot (its ``is_mixed_offload_gpu``, which a test holds this
    to)."""
    places = list(places)
    gpu = any(isinstance(place, int) or isinstance(place, str) and place.lower().startswith("cuda")
              for place in places)
    return gpu and any(isinstance(place, str) and place.lower() in ("cpu", "disk") for place in places)


@contextmanager
def _offload_map_hidden(hf_model) -> Iterator[None]:
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


def alias_weights(alias: str) -> Path:
    """The cached Hugging Face directory (safetensors) of a built-in alias, fetched and converted if needed."""
    model = MODEL_ALIASES[alias]
    return _converted_gguf(lambda: fetch_asset(model.gguf), f"{model.alias}-{model.gguf.sha256[:16]}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _load_hf(location: str | Path, source: ModelSource, dtype: torch.dtype | None, device: str,
             n_layers: int | None, max_memory=None):
    """The HF model on ``device``, its weights read straight there (``auto`` hands accelerate a device map over
    every GPU: TransformerLens cannot take a device map together with a ready model, so the map is made here),
    built with its first ``n_layers`` layers only if given, in ``dtype`` (None: :func:`default_dtype`, recorded
    as the model's ``sinklens_dtype``); and the checkpoint's depth."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoTokenizer,
        GenerationConfig,
    )

    offline, truncated = _offline(), False
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline)
        config = AutoConfig.from_pretrained(location, local_files_only=offline)
        depth = _text_config(config).num_hidden_layers
        truncated = n_layers is not None and n_layers < depth
        if truncated:
            _truncate(config, n_layers)
        device_map = ("auto" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        dtype = default_dtype(config, device_map) if dtype is None else dtype
        offload = {"offload_folder": str(offload_folder(source))} if device_map == "auto" else {}
        with ExitStack() as files:
            reads = _tensors_read_when_converted(location, dtype, device_map, files, n_layers if truncated else None)
            if reads is None:
                model = AutoModelForCausalLM.from_pretrained(location, config=config, dtype=dtype,
                                                             device_map=device_map, max_memory=max_memory,
                                                             local_files_only=offline, **offload)
            else:
                model = AutoModelForCausalLM._model_mapping[type(config)].from_pretrained(
                    None, config=config, state_dict=reads, dtype=dtype, device_map=device_map)
                if (Path(location) / "generation_config.json").is_file():
                    model.generation_config = GenerationConfig.from_pretrained(location)
    except torch.OutOfMemoryError as exc:
        dtype = torch.float32 if dtype is None else dtype
        raise out_of_memory(None, "loading it", n_layers=n_layers, dtype=dtype,
                            device="cuda:0" if device == "auto" else device,
                            weights=checkpoint_bytes(location, dtype, n_layers if truncated else None)) from exc
    except Exception as exc:  # hub, file-format and config errors come in many types
        if source.kind == "hub":
            raise SinklensError(
                f"could not load '{source.spec}': it is not a built-in alias ({aliases()}) nor a local path, "
                f"and the Hugging Face hub did not provide it ({_first_line(exc)})",
                "check the name; without network access pass a local model directory or .gguf file, "
                "or a built-in alias (and set HF_HUB_OFFLINE=1 to fail fast)",
            ) from exc
        if "Unrecognized configuration class" in str(exc):
            raise SinklensError(
                f"{source.spec} is not a causal language model ({_first_line(exc)})",
                "sinklens studies decoder-only LMs: pass a model that AutoModelForCausalLM can load",
            ) from exc
        raise SinklensError(
            f"could not load the model files in {location} ({_first_line(exc)})",
            "the files are incomplete or corrupt: save the model again with save_pretrained(), "
            f"or delete {location} if it is in the sinklens cache",
        ) from exc
    if not model.config.architectures:  # GGUF configs carry none, and TransformerLens needs it
        model.config.architectures = [type(model).__name__]
    model.sinklens_dtype = dtype
    note = offload_note(getattr(model, "hf_device_map", None) or {}, offload.get("offload_folder"))
    if note:
        log.info("%s", note)
    return model.eval(), tokenizer, depth


def default_dtype(config, device_map: str) -> torch.dtype:
    """The dtype a model loads in when none is given: float32 on the CPU; on a GPU the dtype its checkpoint
    declares (:func:`~sinklens.load.sources.checkpoint_dtype_name`), float32 where it declares none."""
    if device_map == "cpu":
        return torch.float32
    declared = checkpoint_dtype_name(config.to_dict())
    return DTYPES[declared] if declared else torch.float32


def offload_folder(source: ModelSource) -> Path:
    """Where accelerate writes the weights of a device map's ``disk`` part: ``offload/`` in the sinklens cache, one
    folder per model (written only when layers fit neither the GPUs nor the CPU)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "--", source.name.strip("/"))[-120:]
    return cache_dir() / "offload" / name


_MAP_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")


def offload_note(device_map: Mapping[str, object], folder: str | Path | None = None) -> str | None:
    """One line saying which parts of a model accelerate's device map put on the CPU or on disk (None when
    everything sits on GPUs): layer ranges, then other modules, and what that costs."""
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
    for place, where in (("cpu", "on the CPU"), ("disk", f"on disk ({folder})" if folder else "on disk")):
        named = ([_layer_ranges(layers[place])] if place in layers else []) + off.get(place, [])
        if named:
            listed = named[0] if len(named) == 1 else f"{', '.join(named[:-1])} and {named[-1]}"
            parts.append(f"{listed} {where}")
    return (f"accelerate placed {'; '.join(parts)}: their weights move to the GPU for every forward pass, so "
            "runs are slower; --max-memory (max_memory=) sets the split, --dtype bfloat16 halves what must fit")


def _layer_ranges(indices: list[int]) -> str:
    indices, runs = sorted(set(indices)), []
    for index in indices:
        if runs and index == runs[-1][1] + 1:
            runs[-1][1] = index
        else:
            runs.append([index, index])
    spans = [str(a) if a == b else f"{a}-{b}" for a, b in runs]
    return f"layer{'s' if len(indices) > 1 else ''} {','.join(spans)}"


def checkpoint_bytes(location: str | Path, dtype: torch.dtype, n_layers: int | None = None) -> int | None:
    """The bytes a checkpoint's weights take in ``dtype`` (only the first ``n_layers`` layers' and the rest, if
    given), read from its safetensors headers; None where its files are not on this machine."""
    folder = Path(location)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(location), allow_patterns=["*.safetensors"], local_files_only=True))
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
            if key != "__metadata__" and (n_layers is None or _built(key, n_layers)):
                numel = 1
                for extent in entry["shape"]:
                    numel *= extent
                total += numel * dtype.itemsize
    return total or None


def _gib(size: int | None) -> str:
    if size is None:
        return "an unknown size"
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.1f} MiB"


def out_of_memory(model: torch.nn.Module | None, what: str, *, n_layers: int | None = None,
                  dtype: torch.dtype | None = None, device: str | None = None,
                  weights: int | None = None) -> SinklensError:
    """The one-line error for a GPU that ran out of memory while ``what`` (loading, wrapping or running a model):
    the weights' size (``model``'s own, or ``weights`` where it is not built), the device's free memory, and the
    fixes that apply: bfloat16 instead of float32, layers on demand where the whole model was built, and
    accelerate's device map with the CPU taking what does not fit."""
    if model is not None:
        hf_model = getattr(model, "original_model", model)
        weights = sum(t.numel() * t.element_size() for t in [*hf_model.parameters(), *hf_model.buffers()])
        dtype = next(hf_model.parameters()).dtype
        device = str(getattr(getattr(model, "cfg", None), "device", None) or next(hf_model.parameters()).device)
        source = getattr(model, "sinklens_source", None) or getattr(hf_model, "sinklens_source", None)
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
        fixes.append("load it in half precision (--dtype bfloat16; dtype='bfloat16'), half the memory")
    if n_layers is None:
        fixes.append("build only the layers a command reads (table, neurons, sink-layer, circuit and scan do; "
                     "load_model(n_layers=...))")
    fixes.append("spread it over the GPU and the CPU (--device auto --max-memory 0=20GiB,cpu=64GiB, with the "
                 "GPU's share below its free memory)")
    if "forward" in what:
        fixes.append("or run fewer tokens at once (fewer repeats, a smaller --batch-size)")
    return SinklensError(f"the GPU ran out of memory while {what}: the model's weights take {_gib(weights)} in "
                         f"{str(dtype).removeprefix('torch.')}{free}", "; ".join(fixes))


def _text_config(config):
    """The config that holds the decoder's depth (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _truncate(config, n_layers: int) -> None:
    """Make ``config`` describe the first ``n_layers`` layers: the depth, and every per-layer list. The head
    is tied to the embeddings: a model cut short has no meaningful logits, and its runs stop before the
    final norm (:func:`sinklens.run.cache.forward`), so its own head need not be read."""
    text = _text_config(config)
    depth = text.num_hidden_layers
    for key, value in vars(text).items():
        if isinstance(value, list) and len(value) == depth:
            setattr(text, key, value[:n_layers])
    text.num_hidden_layers = n_layers
    config.tie_word_embeddings = text.tie_word_embeddings = True


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _tensors_read_when_converted(location: str | Path, dtype: torch.dtype, device_map, files: ExitStack,
                                 n_layers: int | None) -> dict | None:
    """The checkpoint's tensors, each read from disk only when loading converts it, for a local safetensors
    checkpoint loaded on the CPU in another dtype (a float32 analysis of a bfloat16 checkpoint, say); None
    otherwise, and transformers reads the files itself.

    transformers memory-maps safetensors. Without a conversion that is the cheapest read there is: a tensor
    is read when a run first touches it, and layers never run are never read. A conversion touches every
    tensor, and the mapped pages stay resident next to their converted copies until loading ends (the
    first 4 layers of a 7B-shaped bfloat16 checkpoint loaded in float32: 7.7 GB peak for 4.9 GB of
    weights). Read with ``pread`` instead, each tensor's source bytes are freed once it is converted.
    The handles are entered on ``files``, which must stay open while the model loads. With ``n_layers``, only
    the tensors a model of that many layers is built from are offered (:func:`_built`)."""
    from safetensors import safe_open

    folder = Path(location)
    if device_map != "cpu" or not folder.is_dir():
        return None
    index = shard_index(folder / SHARD_INDEX)
    names = sorted(set(index["weight_map"].values())) if index is not None \
        else [path.name for path in folder.glob("*.safetensors")]
    handles = [files.enter_context(safe_open(folder / name, framework="pt", device="cpu", backend="pread"))
               for name in names]
    reads = {key: handle.get_slice(key) for handle in handles for key in handle.keys()
             if n_layers is None or _built(key, n_layers)}
    target = _SAFETENSORS_DTYPES.get(dtype)
    floating = {read.get_dtype() for read in reads.values()} & set(_SAFETENSORS_DTYPES.values())
    return reads if reads and floating - {target} else None


def _converted_gguf(get_gguf, key: str) -> Path:
    """The safetensors copy of a dequantised GGUF, converting it once (about a minute on CPU)."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    gguf = Path(get_gguf())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to float32 safetensors in %s: once, about a minute; later loads take seconds",
             gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:  # the gguf reader raises many types on a damaged file
        raise SinklensError(
            f"{gguf} is not a readable GGUF model file ({type(exc).__name__}: {_first_line(exc)})",
            "download the file again; a truncated or corrupt GGUF cannot be converted",
        ) from exc
    model.hf_quantizer = None  # the weights are plain float32 now; this lets save_pretrained run
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
