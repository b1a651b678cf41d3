"""What a model spec, a dtype and a device name point to, checked without loading anything.

Everything here is plain Python (torch is imported only to ask whether a GPU asked for exists), so
the command line checks its arguments in a fraction of a second and a bad spec, dtype or device
fails before a model is loaded. :mod:`sinklens.load.models` does the loading.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from sinklens.errors import SinklensError
from sinklens.load.registry import MODEL_ALIASES

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
    layers_loaded: int | None = None  # the first layers built, when fewer than n_layers (see load_model)


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
        missing = sorted(name for name in set(index["weight_map"].values()) if not (path / name).is_file())
        if missing:
            raise SinklensError(f"{path} is incomplete: its index {SHARD_INDEX} names {len(missing)} missing shard(s), "
                                f"{', '.join(missing[:3])}", "copy or download the missing files into it")
    return ModelSource(spec, "hf_dir", str(path.resolve()))


def shard_index(path: Path, *, fix: str = "save the model again with save_pretrained()") -> dict | None:
    """A sharded safetensors checkpoint's index (``{"weight_map": {tensor: shard file}, ...}``), or None when
    there is no such file (a checkpoint in one file). An index that is not one is an error saying ``fix``."""
    if not path.is_file():
        return None
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        index["weight_map"] = dict(index["weight_map"])
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise SinklensError(f"{path} is not a safetensors index ({type(exc).__name__}: {exc})", fix) from None
    return index


def aliases() -> str:
    return ", ".join(MODEL_ALIASES)


def check_dtype_name(name: str) -> str:
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
        raise SinklensError(f"device {name} asked for, but this machine has no CUDA GPU (torch {torch.__version__})",
                            "pass --device cpu, or run on a machine with a GPU and a CUDA build of torch")
    if index and int(index) >= torch.cuda.device_count():
        raise SinklensError(f"device {name} asked for, but this machine has {torch.cuda.device_count()} GPU(s)",
                            f"pass cuda:0 to cuda:{torch.cuda.device_count() - 1}, or auto")
    return name if index else "cuda:0"
