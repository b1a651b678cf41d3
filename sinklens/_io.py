"""Atomic file writes and the user cache directory.

Everything sinklens writes (fetched assets, converted weights, results, reports) goes through
these helpers, so an interrupted run never leaves a half-written file behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sinklens.errors import SinklensError


def cache_dir() -> Path:
    """The sinklens cache: ``$SINKLENS_CACHE``, else ``$XDG_CACHE_HOME/sinklens``, else ``~/.cache/sinklens``."""
    if env := os.environ.get("SINKLENS_CACHE"):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "sinklens"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target`` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``target``; on success it becomes ``target``."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield tmp
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: Path, data: Any) -> None:
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output_dir(out: str | Path) -> Path:
    """Raise one clear error unless ``out`` is (or can become) a writable directory."""
    out = Path(out).expanduser()
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if out.exists() and not out.is_dir():
        raise SinklensError(
            f"output path {out} is an existing file, not a directory",
            "pass a directory path for --out (it is created if missing)",
        )
    if existing is not None and not existing.is_dir():
        raise SinklensError(
            f"output path {out} lies under {existing}, which is a file", "pass a directory path"
        )
    if existing is None or not os.access(existing, os.W_OK | os.X_OK):
        raise SinklensError(
            f"cannot write to {out}: {existing or out.anchor} is not writable",
            "pass a directory you can write to",
        )
    return out
