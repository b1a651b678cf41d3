"""Several models in one Table 1, and scans split into shards, locally and on a local Ray instance: the same
rows either way, resumable, and bad input as one clear line before any work."""

from __future__ import annotations

import json
import sys

import pytest

from conftest import SECOND_SINK_LAYER, SINK_LAYER, save_tiny
from sinklens.cli import main

STUDY = ["--n-repeats", "20", "--corpus-chars", "400", "--max-layer", "5"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Two tiny models with planted sinks (one layer; two layers) and one without a sink."""
    root = tmp_path_factory.mktemp("models")
    return {
        "one": save_tiny(root / "one"),
        "two": save_tiny(root / "two", two_layers=True),
        "none": save_tiny(root / "none", plant_sink=False),
    }


@pytest.fixture(scope="module")
def ray_instance():
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()


def _table(models, names, out, *extra):
    args = [
        "table",
        *(a for name in names for a in ("--model", str(models[name]))),
        *STUDY,
        "--out",
        str(out),
        "--json",
        *extra,
    ]
    return main(args)


def test_a_table_of_several_models_has_a_row_each_and_resumes(
    models, long_corpus_file, tmp_path, capsys, monkeypatch
):
    corpus = ["--corpus", str(long_corpus_file)]
    assert _table(models, ["one", "two"], tmp_path, *corpus) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [row["model"] for row in rows] == [str(models["one"]), str(models["two"])]
    assert [row["sink_layer"] for row in rows] == [SINK_LAYER, SECOND_SINK_LAYER]
    assert all(row["dtype"] == "float32" and row["layers_loaded"] == "0..4 of 6" for row in rows)
    assert json.loads((tmp_path / "table.json").read_text())["rows"] == rows
    monkeypatch.setattr(
        "sinklens.load.models._load", lambda *a: pytest.fail("measured a row again")
    )
    assert _table(models, ["one", "two"], tmp_path, *corpus) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == rows


def test_a_model_without_a_sink_gets_its_error_and_the_others_their_rows(
    models, long_corpus_file, tmp_path, capsys
):
    assert _table(models, ["none", "one"], tmp_path, "--corpus", str(long_corpus_file)) == 2
    captured = capsys.readouterr()
    rows = json.loads(captured.out)["rows"]
    assert "shows no sink layer" in rows[0]["error"] and rows[1]["sink_layer"] == SINK_LAYER
    err = [line for line in captured.err.splitlines() if line.startswith("sinklens:")]
    assert len(err) == 1 and "1 of 2 models have no row" in err[0]


def test_the_table_and_a_sharded_scan_on_ray_equal_the_local_runs(
    models, long_corpus_file, tmp_path, capsys, ray_instance
):
    corpus = ["--corpus", str(long_corpus_file)]
    assert _table(models, ["one", "two"], tmp_path / "local", *corpus) == 0
    local = json.loads(capsys.readouterr().out)
    assert _table(models, ["one", "two"], tmp_path / "ray", *corpus, "--ray") == 0
    _assert_same(json.loads(capsys.readouterr().out), local)
    assert (
        len(list((tmp_path / "ray" / "rows").iterdir())) == 2
    )  # one row file per model, written by the tasks

    scan = [
        "scan",
        "--model",
        str(models["one"]),
        *corpus,
        "--n-repeats",
        "20",
        "--tokens",
        "40",
        "--screen-repeats",
        "4",
        "--screen-threshold",
        "0.5",
        "--calibration",
        "10",
        "--json",
    ]
    assert main([*scan, "--out", str(tmp_path / "scan-local")]) == 0
    scanned_locally = json.loads(capsys.readouterr().out)
    assert main([*scan, "--out", str(tmp_path / "scan-ray"), "--ray", "--shards", "2"]) == 0
    scanned_on_ray = json.loads(capsys.readouterr().out)
    assert sorted(p.name for p in (tmp_path / "scan-ray").glob("rows-*")) == [
        f"rows-{i}-of-2.jsonl" for i in (1, 2)
    ]
    _assert_same(scanned_on_ray, scanned_locally)


def _assert_same(a, b, path="") -> None:
    """Equal, floats to float32 rounding: a Ray task runs on one thread, so sums may round in another order."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9), path
    else:
        assert a == b, path


@pytest.mark.parametrize(
    "args, message",
    [
        (["table", "--ray", "127.0.0.1:9"], "cannot reach the Ray cluster at 127.0.0.1:9"),
        (["table", "--ray", "not an address"], "is not a Ray address"),
        (["scan", "--shards", "2"], "--shards splits a scan into Ray tasks and needs --ray"),
        (["scan", "--ray", "--shard", "1/2"], "--ray splits the scan into shards itself"),
        (["scan", "--model", "x", "--model", "y"], "takes one --model, got 2"),
    ],
)
def test_bad_sweep_input_is_one_line_before_any_work(
    args, message, tiny_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.chdir(tmp_path)
    model = [] if "--model" in args else ["--model", str(tiny_dir)]
    assert main([*args, *model]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("sinklens: error:") and message in err[0], err


def test_ray_missing_is_one_line(tiny_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    monkeypatch.setattr("sinklens.load.models._load", lambda *a: pytest.fail("loaded the model"))
    monkeypatch.chdir(tmp_path)
    assert main(["table", "--model", str(tiny_dir), "--ray"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert err == [
        "sinklens: error: --ray needs Ray, which is not installed. Fix: pip install 'sinklens[ray]'"
    ]
