"""The GPU check runs here as it runs on a GPU machine, on the CPU with a small model (``--dry-run``), so that a
change cannot break it unnoticed before a session with a GPU runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench"


def test_the_gpu_check_runs_on_the_cpu_and_finds_the_planted_sink(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--dry-run", "--out", str(out),
                           "--work", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["dry_run"] and json.loads(proc.stdout.strip().splitlines()[-1])["parts_failed"] == []
    assert result["requirements"]["missing"] == [] and result["requirements"]["outside_range"] == []
    tests = result["gpu_tests"]
    assert tests["skipped"] == len(tests["tests"]) >= 6 and tests["failed"] == 0  # no CUDA here: every one skips
    table = result["table"]
    assert table["found_the_planted_sink"]
    assert {side["row"]["sink_neurons"][0] for side in table["sides"].values() if "row" in side} == {77}
    assert table["sides"]["layers_on_demand"]["n_layers_built"] < table["sides"]["whole_model"]["n_layers_built"]
    assert table["sides"]["plain_hf_sdpa"]["tokens"] == table["sides"]["layers_on_demand"]["tokens"] > 0
    assert all(rate > 0 for rate in result["scan"]["tokens_per_second_by_batch"].values())
