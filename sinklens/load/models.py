"""One way to get a ready ``TransformerBridge``: from an alias, a GGUF file, a local HF directory or a hub name.

Every path ends in the same place: a Hugging Face model and tokenizer, handed to
``TransformerBridge.boot_transformers(..., hf_model=...)`` in eval mode with raw (HF-exact)
numerics, and attention fused wherever no hook reads its internals (:mod:`sinklens.load.attention`).
GGUF files are dequantised once and cached as safetensors, so a second load takes seconds. The first fetch and conversion are announced on the ``sinklens`` logger (the
command line prints them); the transformers library's own progress bars and notices stay hidden
unless ``verbose=True``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import atomic_dir, cache_dir, sha256_file
from sinklens.errors import SinklensError
from sinklens.load.assets import fetch_asset
from sinklens.load.attention import use_fused_attention
from sinklens.load.registry import DEFAULT_MODEL, MODEL_ALIASES

SourceKind = Literal["alias", "gguf", "hf_dir", "hub"]
log = logging.getLogger("sinklens")
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
            f"pass an existing .gguf file or Hugging Face model directory, or a built-in alias ({_aliases()})",
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
    return ModelSource(spec, "hf_dir", str(path.resolve()))


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    n_ctx: int | None = None,
    verbose: bool = False,
) -> TransformerBridge:
    """Load ``spec`` as an eval-mode ``TransformerBridge``.

    Attention runs fused (SDPA) on every layer whose attention internals no hook reads, and step by
    step as TransformerLens implements it where one does (see :mod:`sinklens.load.attention`).

    ``spec`` is a built-in alias (``smollm2-135m-instruct``, the default, or ``gemma-3-270m``), a
    ``.gguf`` file, a local Hugging Face directory, or a hub name. The bridge gets a
    ``sinklens_source`` attribute (a :class:`ModelSource`) that results record. ``verbose`` shows
    the transformers library's progress bars and notices.
    """
    with _libraries_quiet(not verbose):
        return _load(spec, dtype, device, n_ctx)


@contextmanager
def _libraries_quiet(quiet: bool) -> Iterator[None]:
    """Hide transformers' and huggingface_hub's progress bars and notices for the duration."""
    if not quiet:
        yield
        return
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars
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
    dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    verbose: bool = False,
):
    """The model of :func:`load_model` as a plain Hugging Face causal LM and its tokenizer, without
    TransformerLens: for ``generate``, lm-evaluation-harness or a server, with a
    :class:`~sinklens.run.patch.SinkPatch` installed as forward hooks. Same specs, same cache."""
    with _libraries_quiet(not verbose):
        hf_model, tokenizer, source = _hf_pair(spec, dtype, device)
    hf_model.sinklens_source = source
    return hf_model, tokenizer


def _hf_pair(spec: str, dtype: torch.dtype, device: str | torch.device | None):
    source = resolve_model(spec)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if source.kind == "alias":
        location = alias_weights(spec)
    elif source.kind == "gguf":
        gguf = Path(source.name)
        location = _converted_gguf(lambda: gguf, f"{gguf.stem}-{sha256_file(gguf)[:16]}")
    else:
        location = source.name
    hf_model, tokenizer = _load_hf(location, source, dtype)
    source = dataclasses.replace(source, bos_token_id=tokenizer.bos_token_id)
    return hf_model.to(device), tokenizer, source


def _load(spec: str, dtype: torch.dtype, device: str | torch.device | None, n_ctx: int | None) -> TransformerBridge:
    hf_model, tokenizer, source = _hf_pair(spec, dtype, device)
    device = hf_model.device
    try:
        bridge = TransformerBridge.boot_transformers(
            source.name, hf_model=hf_model, tokenizer=tokenizer, dtype=dtype, device=device, n_ctx=n_ctx
        )
    except (ValueError, NotImplementedError, KeyError) as exc:
        raise SinklensError(
            f"TransformerLens cannot wrap {source.name} ({type(hf_model).__name__}): {_first_line(exc)}",
            "use a causal LM architecture that TransformerLens 4.3 supports (Llama, Gemma, Mistral, Qwen, GPT-2, ...)",
        ) from exc
    bridge.eval()
    use_fused_attention(bridge)
    bridge.sinklens_source = source
    return bridge


def alias_weights(alias: str) -> Path:
    """The cached Hugging Face directory (safetensors) of a built-in alias, fetched and converted if needed."""
    model = MODEL_ALIASES[alias]
    return _converted_gguf(lambda: fetch_asset(model.gguf), f"{model.alias}-{model.gguf.sha256[:16]}")


def _aliases() -> str:
    return ", ".join(MODEL_ALIASES)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _load_hf(location: str | Path, source: ModelSource, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # huggingface_hub reads HF_HUB_OFFLINE once at import; honour it at call time too, so an
    # offline user gets the error at once instead of after the hub's connection retries.
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=offline)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=dtype, local_files_only=offline)
    except Exception as exc:  # hub, file-format and config errors come in many types
        if source.kind == "hub":
            raise SinklensError(
                f"could not load '{source.spec}': it is not a built-in alias ({_aliases()}) nor a local path, "
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
    return model.eval(), tokenizer


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
