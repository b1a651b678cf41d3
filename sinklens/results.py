"""Result objects: dataclasses of tensors that turn into DataFrames, figures and files.

Every analysis returns one subclass of :class:`Result`. ``to_frame()`` gives long-form pandas,
``plot()`` a plotly figure, ``summary()`` the JSON-able numbers
for ``results.json``. :func:`save_result` / :func:`load_result` round-trip any result through one
``torch.save`` file, which is how long runs resume.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from sinklens._io import atomic_path

_RESULT_TYPES: dict[str, type] = {}
_VALUE_TYPES: dict[str, type] = {}


class Result:
    """Base class of analysis results (subclasses are dataclasses)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _RESULT_TYPES[cls.__name__] = cls

    def to_frame(self):
        """Long-form pandas DataFrame of the result."""
        raise NotImplementedError

    def plot(self):
        """A plotly figure of the result (returned, never shown)."""
        raise NotImplementedError

    def summary(self) -> dict[str, Any]:
        """The JSON-able numbers behind the result."""
        raise NotImplementedError


def _encode(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"__type__": type(value).__name__, "fields": fields}
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    return value


def _decode(value: Any) -> Any:
    if isinstance(value, dict) and "__type__" in value:
        cls = _RESULT_TYPES.get(value["__type__"]) or _VALUE_TYPES[value["__type__"]]
        return cls(**{k: _decode(v) for k, v in value["fields"].items()})
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def value_type(cls: type) -> type:
    """Register a small dataclass (not a result) that results may contain."""
    _VALUE_TYPES[cls.__name__] = cls
    return cls


def save_result(result: Result, path: Path) -> None:
    """Write ``result`` to ``path`` atomically."""
    with atomic_path(Path(path)) as tmp:
        torch.save(_encode(result), tmp)


def load_result(path: Path) -> Result:
    return _decode(torch.load(path, weights_only=True))


def load_or_compute(path: Path, compute: Callable[[], Result]) -> Result:
    """The result saved at ``path``, else ``compute()``, saved there: how reports, evaluations and sweeps resume.
    A file written by an older sinklens, or damaged, is computed again."""
    path = Path(path)
    if path.is_file():
        try:
            return load_result(path)
        except Exception:  # an older layout or a torn file: measure it again
            path.unlink()
    result = compute()
    save_result(result, path)
    return result
