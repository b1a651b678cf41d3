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
import json
import logging
import os
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path

import torch
from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import atomic_dir, cache_dir, sha256_file
from sinklens.errors import SinklensError
from sinklens.load.assets import fetch_asset
from sinklens.load.device_memory import (
    DTYPES,
    checkpoint_bytes,
    default_dtype,
    offload_folder,
    offload_map_hidden,
    offload_note,
    out_of_memory,
    read_by_layers,
    tensors_read_when_converted,
    text_config,
    truncate_config,
)
from sinklens.load.fused_attention import use_fused_attention
from sinklens.load.ndif import NdifHost, first_line, require_nnsight
from sinklens.load.quiet import libraries_quiet
from sinklens.load.registry import DEFAULT_MODEL, MODEL_ALIASES
from sinklens.load.sources import (
    REMOTE_TIMEOUT,
    SHARD_INDEX,
    ModelSource,
    aliases,
    check_device,
    check_dtype_name,
    check_max_memory,
    check_remote,
    resolve_model,
    shard_index,
)
from sinklens.load.traced import TracedModel, load_traced

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


def placement(model: torch.nn.Module | TracedModel) -> dict[str, str]:
    """The dtype and device(s) a loaded model runs in, as results record them."""
    if isinstance(model, TracedModel):
        record = model.placement()
    else:
        hf_model = getattr(model, "original_model", model)
        device_map = getattr(hf_model, "hf_device_map", None) or {}
        devices = sorted({str(d) for d in device_map.values()}) or [
            str(next(model.parameters()).device)
        ]
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
    backend: str = "transformer_lens",
    remote: bool | str = False,
    host: str | None = None,
    remote_timeout: float = REMOTE_TIMEOUT,
) -> TransformerBridge:
    """Load ``spec`` as an eval-mode ``TransformerBridge``.

    ``n_layers`` builds only the first ``n_layers`` layers (with the embeddings and the final norm): only
    their tensors are read, converted and moved, so an early-layer analysis of a 70B checkpoint reads a
    few GB. The activations of layers ``0..n_layers-1`` are those of the whole model; the logits mean
    nothing (the head is tied to the embeddings and never read, and runs stop after the last layer
    built). Default: every layer. A checkpoint stored in another dtype is converted tensor by tensor as
    it is read, so its source bytes never pile up beside the converted weights.

    ``dtype`` is the weights' and activations' precision (``float32``, ``bfloat16`` or ``float16``;
    the analyses compute norms, statistics and thresholds in float32 whatever it is). None: float32
    on the CPU, and on a GPU the dtype the checkpoint declares (its ``config.json``; float32 where
    it declares none), so a 7B checkpoint stored in bfloat16 takes 13.5 GB of GPU memory rather than
    27. ``device`` is ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (see :func:`as_device`; default: the
    first GPU, else the CPU). With ``auto``, ``max_memory`` caps what accelerate's device map puts
    on each device (``{0: "20GiB", "cpu": "60GiB"}``, as ``from_pretrained`` takes it, or the
    command line's text ``"0=20GiB,cpu=60GiB"``, see
    :func:`~sinklens.load.sources.parse_max_memory`); layers that do not fit the GPUs are offloaded
    to the CPU and run on the GPU, their weights moved there for each forward pass, and what does
    not fit the CPU either to disk, in the sinklens cache (``offload/``). Where accelerate puts
    layers off the GPU, one line on the ``sinklens`` logger says which and where. A GPU that runs
    out of memory while loading is one :class:`~sinklens.errors.SinklensError` naming the model's
    size, the free memory and the fixes.

    Attention runs fused (SDPA) on every layer whose attention internals no hook reads, and step by
    step as TransformerLens implements it where one does (see :mod:`sinklens.load.fused_attention`).

    ``spec`` is a built-in alias (``smollm2-135m-instruct``, the default, or ``gemma-3-270m``), a
    ``.gguf`` file, a local Hugging Face directory, or a hub name. The bridge gets a
    ``sinklens_source`` attribute (a :class:`ModelSource`) that results record. ``verbose`` shows
    the transformers library's progress bars and notices.

    ``backend="nnsight"`` gives the same model as a :class:`~sinklens.load.traced.TracedModel`, which the
    analyses that run the model, read hooks and ablate neurons run on unchanged, as nnsight traces. With
    ``remote=True`` it runs on an NDIF server (``host``, else ``NDIF_HOST``, else NDIF; the key from
    ``NDIF_API_KEY``) and is not loaded here: ``spec`` is then a hub name the server serves (or a directory a
    self-hosted server shares); ``remote="local"`` is nnsight's local simulation of a remote run. A remote
    job that outlives ``remote_timeout`` seconds is an error.
    """
    placed = any(x is not None for x in (dtype, device, max_memory))
    check_remote(backend, remote, host, remote_timeout, placed)
    dtype, device = None if dtype is None else as_dtype(dtype), as_device(device)
    if n_layers is not None and n_layers < 1:
        raise SinklensError(
            f"n_layers={n_layers} builds no layer", "pass at least 1, or None for the whole model"
        )
    max_memory = _check_max_memory(device, max_memory)
    if backend == "nnsight":
        if n_ctx is not None:
            raise SinklensError(
                "the nnsight backend runs the model with its own context length",
                "drop n_ctx, or load it with the TransformerLens backend",
            )
        with libraries_quiet(not verbose):
            return _load_traced(  # type: ignore[return-value]  # a TracedModel runs every analysis it can
                spec, dtype, device, n_layers, max_memory, remote, host, remote_timeout
            )
    with libraries_quiet(not verbose):
        return _load(spec, dtype, device, n_ctx, n_layers, max_memory)


def _load_traced(spec, dtype, device, n_layers, max_memory, remote, host, timeout) -> TracedModel:
    require_nnsight()
    if remote is True:
        ndif = NdifHost.of(
            host, spec, timeout
        )  # the host and key first: nothing is fetched without them
        source = resolve_model(spec)
        if source.kind == "gguf":
            raise SinklensError(
                f"{spec} is a GGUF file here, which no NDIF server holds",
                "pass the hub name NDIF serves (or a directory a self-hosted server shares)",
            )
        # a built-in alias is a GGUF copy of a hub model: the server is asked for the hub model
        location = MODEL_ALIASES[spec].hub_name if source.kind == "alias" else source.name
        return load_traced(location, source, remote=ndif)
    hf_model, tokenizer, source = _hf_pair(spec, dtype, device, n_layers, max_memory)
    return load_traced(source.name, source, hf_model=hf_model, tokenizer=tokenizer, remote=remote)


def _check_max_memory(device: str, max_memory) -> dict[int | str, int] | None:
    max_memory = check_max_memory(max_memory)
    if max_memory is not None and device != "auto":
        raise SinklensError(
            f"max_memory caps accelerate's device map, but the device is {device}",
            "pass device='auto' with it (--device auto), or drop max_memory",
        )
    return max_memory


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
    with libraries_quiet(not verbose):
        hf_model, tokenizer, source = _hf_pair(spec, dtype, device, None, max_memory)
    hf_model.sinklens_source = source
    return hf_model, tokenizer


def _hf_pair(
    spec: str, dtype: torch.dtype | None, device: str, n_layers: int | None, max_memory=None
):
    source = resolve_model(spec)
    location = _location(source, spec, n_layers)
    hf_model, tokenizer, depth = _load_hf(location, source, dtype, device, n_layers, max_memory)
    loaded = hf_model.config.num_hidden_layers
    source = dataclasses.replace(
        source,
        bos_token_id=tokenizer.bos_token_id,
        n_layers=depth,
        layers_loaded=loaded if loaded < depth else None,
    )
    return hf_model, tokenizer, source


def _location(source: ModelSource, spec: str, n_layers: int | None) -> str | Path:
    """Where the Hugging Face files of ``spec`` are: a hub name, or a local directory (GGUF files
    and aliases converted once into the cache; with ``n_layers``, a view of a sharded hub checkpoint
    holding only those layers)."""
    if source.kind == "alias":
        return alias_weights(spec)
    if source.kind == "gguf":
        gguf = Path(source.name)
        return _converted_gguf(lambda: gguf, f"{gguf.stem}-{sha256_file(gguf)[:16]}")
    if source.kind == "hub" and n_layers is not None:
        return _hub_early_layers(source.spec, n_layers) or source.name
    return source.name


def _offline() -> bool:
    """HF_HUB_OFFLINE as set now: huggingface_hub reads it once at import, and honouring it at call time
    too gives an offline user the error at once instead of after the hub's connection retries."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


_HUB_SIDE_FILES = (
    "*.json",
    "*.model",
    "*.txt",
    "*.tiktoken",
    "*.py",
)  # config, tokenizer, generation settings


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
    index = shard_index(
        index_file, fix=f"delete {index_file.parent} from the hub cache to fetch it again"
    )
    assert index is not None  # hf_hub_download returned the file
    weight_map = index["weight_map"]
    kept = {key: shard for key, shard in weight_map.items() if read_by_layers(key, n_layers)}
    folder = Path(
        snapshot_download(
            repo,
            allow_patterns=[*sorted(set(kept.values())), *_HUB_SIDE_FILES],
            local_files_only=offline,
        )
    )
    view = cache_dir() / "hub-views" / f"{repo.replace('/', '--')}-layers-{n_layers}"
    with atomic_dir(view) as tmp:
        for path in folder.iterdir():
            if path.name != SHARD_INDEX:
                (tmp / path.name).symlink_to(path.resolve())
        (tmp / SHARD_INDEX).write_text(json.dumps({**index, "weight_map": kept}), encoding="utf-8")
    return view


def _load(
    spec: str,
    dtype: torch.dtype | None,
    device: str,
    n_ctx: int | None,
    n_layers: int | None,
    max_memory=None,
) -> TransformerBridge:
    hf_model, tokenizer, source = _hf_pair(spec, dtype, device, n_layers, max_memory)
    dtype = hf_model.sinklens_dtype
    device = hf_model.device  # with a device map: where the embeddings are
    try:
        with offload_map_hidden(hf_model):
            bridge = TransformerBridge.boot_transformers(
                source.name,
                hf_model=hf_model,
                tokenizer=tokenizer,
                dtype=dtype,
                device=device,
                n_ctx=n_ctx,
            )
    except torch.OutOfMemoryError as exc:
        raise out_of_memory(hf_model, "TransformerLens wrapped it", n_layers=n_layers) from exc
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise SinklensError(
            f"TransformerLens cannot wrap {source.name} ({type(hf_model).__name__}): {first_line(exc)}",
            "use a causal LM architecture that TransformerLens 4.3 supports (Llama, Gemma, Mistral, Qwen, GPT-2, ...)",
        ) from exc
    bridge.eval()
    use_fused_attention(bridge)
    bridge.sinklens_source = source
    return bridge


def alias_weights(alias: str) -> Path:
    """The cached Hugging Face directory (safetensors) of a built-in alias, fetched and converted if needed."""
    model = MODEL_ALIASES[alias]
    return _converted_gguf(
        lambda: fetch_asset(model.gguf), f"{model.alias}-{model.gguf.sha256[:16]}"
    )


def _load_hf(
    location: str | Path,
    source: ModelSource,
    dtype: torch.dtype | None,
    device: str,
    n_layers: int | None,
    max_memory=None,
):
    """The HF model on ``device``, its weights read straight there (``auto`` hands accelerate a
    device map over every GPU: TransformerLens cannot take a device map together with a ready model,
    so the map is made here), built with its first ``n_layers`` layers only if given, in ``dtype``
    (None: :func:`default_dtype`, recorded as the model's ``sinklens_dtype``); and the checkpoint's
    depth."""
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
        depth = text_config(config).num_hidden_layers
        truncated = n_layers is not None and n_layers < depth
        if truncated:
            assert n_layers is not None  # truncated implies it
            truncate_config(config, n_layers)
        device_map = (
            ("auto" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        )
        dtype = default_dtype(config, device_map) if dtype is None else dtype
        offload = {"offload_folder": str(offload_folder(source))} if device_map == "auto" else {}
        with ExitStack() as files:
            reads = tensors_read_when_converted(
                location, dtype, device_map, files, n_layers if truncated else None
            )
            if reads is None:
                model = AutoModelForCausalLM.from_pretrained(
                    location,
                    config=config,
                    dtype=dtype,
                    device_map=device_map,
                    max_memory=max_memory,
                    local_files_only=offline,
                    **offload,
                )
            else:
                # transformers types _LazyAutoMapping.__getitem__ as returning a tuple of classes
                model_class = AutoModelForCausalLM._model_mapping[type(config)]
                model = model_class.from_pretrained(  # type: ignore[attr-defined]
                    None, config=config, state_dict=reads, dtype=dtype, device_map=device_map
                )
                if (Path(location) / "generation_config.json").is_file():
                    model.generation_config = GenerationConfig.from_pretrained(location)
    except torch.OutOfMemoryError as exc:
        dtype = torch.float32 if dtype is None else dtype
        raise out_of_memory(
            None,
            "loading it",
            n_layers=n_layers,
            dtype=dtype,
            device="cuda:0" if device == "auto" else device,
            weights=checkpoint_bytes(location, dtype, n_layers if truncated else None),
        ) from exc
    except Exception as exc:  # hub, file-format and config errors come in many types
        if source.kind == "hub":
            raise SinklensError(
                f"could not load '{source.spec}': it is not a built-in alias ({aliases()}) nor a local path, "
                f"and the Hugging Face hub did not provide it ({first_line(exc)})",
                "check the name; without network access pass a local model directory or .gguf file, "
                "or a built-in alias (and set HF_HUB_OFFLINE=1 to fail fast)",
            ) from exc
        if "Unrecognized configuration class" in str(exc):
            raise SinklensError(
                f"{source.spec} is not a causal language model ({first_line(exc)})",
                "sinklens studies decoder-only LMs: pass a model that AutoModelForCausalLM can load",
            ) from exc
        raise SinklensError(
            f"could not load the model files in {location} ({first_line(exc)})",
            "the files are incomplete or corrupt: save the model again with save_pretrained(), "
            f"or delete {location} if it is in the sinklens cache",
        ) from exc
    if not model.config.architectures:  # GGUF configs carry none, and TransformerLens needs it
        model.config.architectures = [type(model).__name__]
    # torch types Module.__setattr__ for tensors and modules only
    model.sinklens_dtype = dtype  # type: ignore[assignment]
    note = offload_note(getattr(model, "hf_device_map", None) or {}, offload.get("offload_folder"))
    if note:
        log.info("%s", note)
    return model.eval(), tokenizer, depth


def _converted_gguf(get_gguf, key: str) -> Path:
    """The safetensors copy of a dequantised GGUF, converting it once (about a minute on CPU)."""
    target = cache_dir() / "models" / key
    if (target / "config.json").is_file():
        return target
    gguf = Path(get_gguf())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info(
        "converting %s to float32 safetensors in %s: once, about a minute; later loads take seconds",
        gguf.name,
        target,
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
    except Exception as exc:  # the gguf reader raises many types on a damaged file
        raise SinklensError(
            f"{gguf} is not a readable GGUF model file ({type(exc).__name__}: {first_line(exc)})",
            "download the file again; a truncated or corrupt GGUF cannot be converted",
        ) from exc
    # the weights are plain float32 now; this lets save_pretrained run (ignore: torch types
    # Module.__setattr__ for tensors and modules only)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if not model.config.architectures:
        model.config.architectures = [type(model).__name__]
    with atomic_dir(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target
