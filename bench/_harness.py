"""Shared by the benchmarks: each measurement runs in a fresh process, the two sides alternate, and
ratios are reported as medians with their range (peak RSS in particular varies between processes).

A worker is Python source run with ``python -c``; it starts with :data:`PRELUDE`, which gives it
``measure(run, rounds)``: one warm-up call, then ``rounds`` timed calls, the best kept, and the
growth of the process' resident set above its level before the calls (Linux VmHWM, reset through
/proc/self/clear_refs). The worker prints one JSON line; :func:`run_worker` returns it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

PRELUDE = r"""
import json, sys, time
import torch
torch.set_grad_enabled(False)

def _rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))

def measure(run, rounds):
    run()  # warm-up
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _rss("VmRSS")
    times = []
    for _ in range(rounds):
        start = time.perf_counter(); checksum = run(); times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_bytes": _rss("VmHWM") - base, "checksum": float(checksum)}
"""


def run_worker(worker: str, *args, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + worker, *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
    )
    if proc.returncode != 0:
        sys.exit(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def alternate(worker: str, ours: tuple, plain: tuple, trials: int) -> list[tuple[dict, dict]]:
    """``trials`` pairs of (sinklens, plain) measurements, run one after the other."""
    return [(run_worker(worker, *ours), run_worker(worker, *plain)) for _ in range(trials)]


def print_pairs(
    title: str,
    pairs: list[tuple[dict, dict]],
    targets: dict[str, float],
    names: tuple[str, str] = ("sinklens", "plain HF"),
    same_results: bool = True,
) -> dict:
    """Medians per side, then the time and memory ratios (first side over second) with their range
    against their targets, and whether both sides computed the same checksum. Returns the same as a
    dict (``time_ratio``, ``memory_ratio``, ``same_results``, ``targets``) for :func:`print_summary`."""
    print(title)
    for name, side in zip(names, (0, 1)):
        seconds = statistics.median(pair[side]["seconds"] for pair in pairs)
        peak = statistics.median(pair[side]["peak_bytes"] for pair in pairs)
        print(f"  {name} median {seconds:.2f} s, peak +{peak / 2**20:.0f} MiB")
    summary: dict = {"targets": {}}
    for key, label in (("seconds", "time"), ("peak_bytes", "memory")):
        if key not in targets:
            continue
        ratios = [ours[key] / max(plain[key], 1e-9) for ours, plain in pairs]
        print(
            f"  {label} ratio median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}; "
            f"target <= {targets[key]}x)"
        )
        summary[f"{label}_ratio"] = round(statistics.median(ratios), 3)
        summary[f"{label}_ratio_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        summary["targets"][f"{label}_ratio"] = f"<= {targets[key]}"
    if same_results:
        same = all(
            abs(o["checksum"] - p["checksum"]) <= 1e-4 * abs(p["checksum"]) for o, p in pairs
        )
        print(f"  same results: {same}")
        summary["same_results"] = same
    return summary


def print_summary(bench: str, **results) -> None:
    """The bench's last line: one JSON object with its ratios and targets, for scripts to read."""
    print(json.dumps({"bench": bench, **results}))
