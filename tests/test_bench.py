"""The GPU check runs here as it runs on a GPU machine, on the CPU with a small model
(``--dry-run``), so that a change cannot break it unnoticed before a session with a GPU runs it;
what makes it fail is tested on crafted records; the docs' GPU tables are what the committed records
give."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_check  # noqa: E402
import gpu_tables  # noqa: E402


def test_the_gpu_check_runs_on_the_cpu_and_records_like_work_on_both_sides(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "gpu_check.py"),
            "--dry-run",
            "--out",
            str(out),
            "--work",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["record"] == gpu_check.RECORD_FORMAT and record["dry_run"]
    assert record["failures"] == [] and record["exit_status"] == 0
    assert json.loads(proc.stdout.strip().splitlines()[-1])["failures"] == []
    assert record["requirements"]["missing"] == [] and record["requirements"]["outside_range"] == []
    assert record["packages"]["versions"]["torch"] and record["machine"]["cpus"] > 0
    tests = record["gpu_tests"]
    assert (
        tests["skipped"] == len(tests["tests"]) >= 6 and tests["failed"] == 0
    )  # no CUDA here: every one skips
    table = record["table"]
    sides = table["sides"]
    assert table["found_the_planted_sink"] and table["planted"] == [gpu_check.SINK_LAYER, 77]
    for name in gpu_check.ROW_SIDES:
        side = sides[name]
        assert (
            side["row"]["sink_layer"] == gpu_check.SINK_LAYER and 77 in side["row"]["sink_neurons"]
        )
        # like work: the plain side ran the same forward passes, each through the same layers, on
        # the same tokens
        assert (
            side["layers_run"] == sides["plain_hf_sdpa"]["layers_run"]
            and len(side["layers_run"]) > 1
        )
        assert side["tokens"] == sides["plain_hf_sdpa"]["tokens"] > 0
        assert side["forwards"] == len(side["layers_run"]) == sides["plain_hf_sdpa"]["forwards"]
        assert side["forward_seconds"] > 0 and side["other_seconds"] >= 0
        assert (
            side["dtype"] == sides["plain_hf_sdpa"]["dtype"] == "float32"
        )  # dtype=None: float32 on the CPU
        assert side["command"].startswith("python bench/gpu_check.py --worker row")
    assert max(sides["layers_on_demand"]["layers_run"]) < sides["whole_model"]["n_layers_built"]
    assert sides["layers_on_demand"]["n_layers_built"] < sides["whole_model"]["n_layers_built"]
    assert all(c["within"] for c in table["comparisons"] if c["enforced"])
    assert not any(
        c["enforced"] for c in table["comparisons"] if c["tolerance"].startswith("<=")
    )  # CPU: no speed
    scan = record["scan"]
    assert (
        all(rate > 0 for rate in scan["tokens_per_second_by_batch"].values())
        and scan["default_batch"] == 4
    )
    names = {figure["name"] for figure in record["figures"]}
    assert {
        "table.layers_on_demand.row_seconds",
        "table.plain_hf_sdpa.seconds",
        "scan.default_batch",
    } <= names
    assert all(figure["command"] for figure in record["figures"])


def _passing_record() -> dict:
    """A record as a GPU run that passes writes it (the parts the verdict reads)."""
    row = {"sink_layer": 1, "sink_neurons": [7890], "first_token_norm": 20503.0}
    side = {"row": row, "layers_run": [15, 15, 2], "tokens": 900, "row_seconds": 0.6}
    return {
        "record": gpu_check.RECORD_FORMAT,
        "dry_run": False,
        "machine": {"gpu": {"name": "H200"}},
        "requirements": {"missing": [], "outside_range": []},
        "gpu_tests": {
            "passed": 2,
            "failed": 0,
            "skipped": 0,
            "tests": {
                "test_a": {"outcome": "passed", "seconds": 1.0},
                "test_b": {"outcome": "passed", "seconds": 1.0},
            },
        },
        "table": {
            "planted": [1, 7890],
            "sides": {
                "layers_on_demand": side,
                "whole_model": copy.deepcopy(side),
                "plain_hf_sdpa": {"layers_run": [15, 15, 2], "tokens": 900},
            },
            "comparisons": [
                gpu_check.compare("layers_on_demand: row time over plain HF", 1.2, "<= 1.5")
            ],
        },
        "scan": {"tokens_per_second_by_batch": {"4": 250.0, "32": 480.0}},
    }


def test_a_passing_record_passes():
    assert gpu_check.failures(_passing_record(), cuda=True) == []


def test_a_skipped_gpu_test_fails_the_check_on_a_machine_with_cuda_only():
    record = _passing_record()
    record["gpu_tests"]["tests"]["test_b"] = {
        "outcome": "skipped",
        "seconds": 0.0,
        "message": "needs a CUDA GPU",
    }
    assert gpu_check.failures(record, cuda=False) == []  # a dry run: nothing can run
    assert gpu_check.failures(record, cuda=True) == [
        "gpu test skipped on a machine with CUDA: test_b (needs a CUDA GPU)"
    ]
    record["gpu_tests"]["tests"] = {}
    assert gpu_check.failures(record, cuda=True) == ["no gpu test ran on a machine with CUDA"]


def test_a_failed_gpu_test_fails_the_check_everywhere():
    record = _passing_record()
    record["gpu_tests"]["tests"]["test_a"]["outcome"] = "failed"
    assert gpu_check.failures(record, cuda=False) == ["gpu test failed: test_a"]


@pytest.mark.parametrize(
    "missed, expected",
    [
        ({"sink_layer": 2}, "layers_on_demand: the row's sink layer is 2, the planted one 1"),
        (
            {"sink_neurons": [10411]},
            "layers_on_demand: the row's sink neurons [10411] miss the planted 7890",
        ),
        ({"sink_neurons": []}, "layers_on_demand: the row's sink neurons [] miss the planted 7890"),
    ],
)
def test_a_row_that_misses_the_planted_sink_fails_the_check(missed, expected):
    record = _passing_record()
    record["table"]["sides"]["layers_on_demand"]["row"].update(missed)
    assert gpu_check.failures(record, cuda=False) == [expected]


def test_a_part_that_errors_or_never_ran_fails_the_check():
    record = _passing_record()
    record["table"] = {"error": "RuntimeError: worker row failed", "part_seconds": 3.0}
    del record["scan"]
    assert gpu_check.failures(record, cuda=True) == [
        "part table errored: RuntimeError: worker row failed",
        "part scan did not run",
    ]


def test_a_comparison_beyond_its_tolerance_fails_the_check_only_where_enforced():
    record = _passing_record()
    record["table"]["comparisons"] = [
        gpu_check.compare("layers_on_demand: row time over plain HF", 1.8, "<= 1.5"),
        gpu_check.compare("whole_model: row time over plain HF", 2.5, "<= 1.5", enforced=False),
        gpu_check.compare("whole_model: layers_run equal to plain HF's", False, "== true"),
    ]
    assert gpu_check.failures(record, cuda=True) == [
        "layers_on_demand: row time over plain HF is 1.8, beyond its tolerance <= 1.5",
        "whole_model: layers_run equal to plain HF's is False, beyond its tolerance == true",
    ]


def test_a_requirement_missing_or_out_of_range_fails_the_check():
    record = _passing_record()
    record["requirements"] = {"missing": ["plotly"], "outside_range": ["torch 2.9.0 not >=2.11"]}
    assert gpu_check.failures(record, cuda=True) == [
        "requirement missing: plotly",
        "requirement out of range: torch 2.9.0 not >=2.11",
    ]


def test_the_check_exits_with_the_verdict(tmp_path, monkeypatch):
    """``check`` writes the verdict into the record and returns it as the exit status."""
    record = _passing_record()
    record["table"]["sides"]["whole_model"]["row"]["sink_layer"] = 3
    parts = {
        "machine": lambda: record["machine"],
        "packages": lambda: {"count": 0, "versions": {}},
        "requirements": lambda: record["requirements"],
        "gpu_tests": lambda folder: record["gpu_tests"],
        "build_checkpoint": lambda directory, kind: {},
        "table": lambda *args: {**record["table"], "scan": record["scan"]},
    }
    for name, part in parts.items():
        monkeypatch.setattr(gpu_check, name, part)
    out = tmp_path / "record.json"
    assert gpu_check.check(out, dry_run=True, work=tmp_path) == 1
    written = json.loads(out.read_text())
    assert written["exit_status"] == 1
    assert written["failures"] == ["whole_model: the row's sink layer is 3, the planted one 1"]


def test_the_gpu_tables_name_their_record_and_mark_unrecorded_figures(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    record = _passing_record()
    record.update(
        date="2027-01-02T03:04:05+00:00",
        command="python bench/gpu_check.py --out x.json",
        exit_status=0,
        failures=[],
        packages={"versions": {"transformers": "5.17.0"}},
    )
    record["table"]["sides"]["plain_hf_sdpa"].update(seconds=0.5, dtype="bfloat16")
    (results / "gpu_check-2027-01-02-h200.json").write_text(json.dumps(record))
    (results / "dry.json").write_text(
        json.dumps({**record, "dry_run": True})
    )  # dry runs are no GPU record
    unrecorded = json.loads((BENCH / "results" / "unrecorded-2026-12-04-h200.json").read_text())
    (results / "unrecorded.json").write_text(json.dumps(unrecorded))
    docs = tmp_path / "docs" / "results.md"
    docs.parent.mkdir()
    docs.write_text(
        f"# Results\n\n## On a GPU\n\n{gpu_tables.BEGIN}\nold\n{gpu_tables.END}\n\n## Test suite\n"
    )
    text = gpu_tables.rewrite(docs.read_text(), gpu_tables.block(results, docs))
    block = text.split(gpu_tables.BEGIN)[1].split(gpu_tables.END)[0]
    assert "old" not in block and text.startswith("# Results") and text.endswith("## Test suite\n")
    link = "[`gpu_check-2027-01-02-h200.json`](../bench/results/gpu_check-2027-01-02-h200.json)"
    rows = [
        line
        for line in block.splitlines()
        if line.startswith("| ") and not line.startswith("| test |")
    ]
    table_rows = [
        line for line in rows if not line.startswith(("| side |", "| comparison |", "| batch"))
    ]
    assert table_rows and all(
        line.endswith(f"| {link} |") or line.endswith(f"| {gpu_tables.NO_RECORD} |")
        for line in table_rows
        if not line.startswith("|---")
    )
    assert (
        "| 15 x2, 2 |" in block and "1.20x" in block
    )  # layers run per forward pass, the row over plain
    assert "dry.json" not in block and "3.35 s" in block and block.count(gpu_tables.NO_RECORD) >= 10


def test_the_committed_docs_hold_what_the_committed_records_give():
    proc = subprocess.run(
        [sys.executable, str(BENCH / "gpu_tables.py"), "--check"], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
