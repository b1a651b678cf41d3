"""Result objects: dataclasses of tensors that turn into DataFrames, figures and files.

Every analysis returns one subclass of :class:`Result`. ``to_frame()`` gives long-form pandas,
``plot()`` a plotly figure, ``summary()`` the JSON-able numbers
for ``results.json``. :func:`save_result` / :func:`load_result` round-trip any result through one
``torch.save`` file, which is how long runs resume; :class:`Steps` resumes a study of several results.
"""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any, TypeVar

import torch
from tqdm.auto import tqdm

from sinklens._io import atomic_path, write_text

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


R = TypeVar("R", bound=Result)


def load_or_compute(path: Path, compute: Callable[[], R]) -> R:
    """The result saved at ``path``, else ``compute()``, saved there: how reports, evaluations and sweeps resume.
    A file written by an older sinklens, or damaged, is computed again."""
    path = Path(path)
    if path.is_file():
        try:
            return load_result(path)  # type: ignore[return-value]
        except Exception:  # an older layout or a torn file: measure it again
            path.unlink()
    result = compute()
    save_result(result, path)
    return result


def versions() -> dict[str, str]:
    """The versions of sinklens and of the libraries its numbers depend on, recorded with every result file."""
    return {
        name: version(name) for name in ("sinklens", "transformer-lens", "transformers", "torch")
    }


class Steps:
    """The steps of a long study, each computed once: its result is saved under ``OUT/.steps`` as soon as it is
    computed, so an interrupted run resumes where it stopped when run again with the same ``fingerprint`` (a
    run of other settings starts afresh), and a progress bar names the step in hand.

    Use it as a context manager and call it with a step's name and a function that computes it::

        with Steps(out, settings.fingerprint(model_name), total=9, desc="sinklens report") as step:
            row = step("table", lambda: sink_table_row(model, text, settings))
    """

    def __init__(
        self, out: Path, fingerprint: str, *, total: int, desc: str, progress: bool = False
    ):
        self.dir = Path(out) / ".steps"
        stamp = self.dir / "fingerprint"
        if not stamp.is_file() or stamp.read_text() != fingerprint:
            shutil.rmtree(self.dir, ignore_errors=True)
            write_text(stamp, fingerprint)
        self.bar = tqdm(total=total, desc=desc, disable=not progress)

    def __enter__(self) -> Steps:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.bar.close()

    def __call__(self, name: str, compute: Callable[[], R]) -> R:
        self.bar.set_postfix_str(name)
        result = load_or_compute(self.dir / f"{name}.pt", compute)
        self.bar.update()
        return result
