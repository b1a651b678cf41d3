"""Benchmark: the Table-1 row's time outside forward passes, per forward pass, today's code against
this tree's.

On a GPU a forward pass of 7B layers is milliseconds of matrix work, so whatever the row does
between and around its forward passes (hook bookkeeping, tokenising, building ablation masks, moving
small tensors) decides whether it keeps up with plain Hugging Face. On 2 CPU cores that cost hides
behind the forwards. This bench exposes it: the row (``sink_table_row``, what ``sinklens table``
runs) on a small model of the 7B check's construction (``bench/gpu_check.py --dry-run``'s: 16
layers, d_model 64, a planted sink), where a forward pass costs almost nothing, with every call of
the Hugging Face decoder timed. The time outside those calls, divided by their number, is the row's
overhead per forward pass.

Both sides run in fresh, alternating processes (``bench/_harness.py``), one torch thread each:

* **today**: the code of ``--baseline`` (default ``9ce0955``, the last release), materialised with
  ``git archive`` into a temporary folder and put first on ``PYTHONPATH``;
* **new**: this working tree.

Each process warms up with two rows, then times ``--rounds`` rows and keeps the one with the least
time outside forward passes (the machine is shared: the least disturbed round). Both sides must give
the same row (sink layer, neurons, norms, bit for bit) and run the same forward passes. The last
line is one JSON object with both overheads and ``overhead_cut`` (today's over the new; target at
least 3).

Usage: ``python bench/bench_overhead.py [--repeats N] [--trials N] [--rounds N]
[--baseline COMMIT]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from _harness import PRELUDE

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "9ce0955"
TARGET = 3.0

WORKER = r"""
checkpoint, n_repeats, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
import sinklens
from sinklens.load.corpus import shakespeare
from sinklens.load.models import load_model
from sinklens.settings import Settings
from sinklens.studies.table import sink_table_row

settings = Settings(words=["the", "you"], n_repeats=n_repeats)
model = load_model(checkpoint, dtype="float32", device="cpu", n_layers=settings.max_layer)
text = shakespeare()
decoder = model.original_model.model
plain_forward = decoder.forward
inside = {"calls": 0, "seconds": 0.0}

def timed_forward(*args, **kwargs):
    start = time.perf_counter()
    try:
        return plain_forward(*args, **kwargs)
    finally:
        inside["calls"] += 1
        inside["seconds"] += time.perf_counter() - start

decoder.forward = timed_forward

def row_once():
    inside.update(calls=0, seconds=0.0)
    start = time.perf_counter()
    row = sink_table_row(model, text, settings)
    total = time.perf_counter() - start
    return row, total, dict(inside)

for _ in range(2):
    row_once()  # warm-up
best = None
for _ in range(rounds):
    row, total, seen = row_once()
    outside = total - seen["seconds"]
    if best is None or outside < best["outside_seconds"]:
        best = {"row_seconds": total, "forward_seconds": seen["seconds"],
                "outside_seconds": outside, "forwards": seen["calls"]}
s = row.summary()
keys = ("sink_layer", "sink_neurons", "first_token_norm", "first_token_norm_ablated",
        "typical_norm", "repeat_max_norm", "repeat_max_norm_ablated", "repeats_to_sink",
        "first_crossing")
best["row"] = {k: s[k] for k in keys}
best["row"]["words"] = [[w["max_norm"], w["max_norm_ablated"]] for w in s["words"]]
best["sinklens"] = sinklens.__file__
print(json.dumps(best))
"""


def materialise(commit: str, folder: Path) -> Path:
    """The ``sinklens`` package of ``commit``, unpacked under ``folder`` (``git archive``)."""
    folder.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(
        ["git", "archive", commit, "sinklens"], cwd=ROOT, capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def run(worker_path: Path, checkpoint: Path, repeats: int, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(worker_path), "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", PRELUDE + WORKER, str(checkpoint), str(repeats), str(rounds)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode != 0:
        sys.exit(f"worker on {worker_path} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def per_forward_ms(side: dict) -> float:
    return 1e3 * side["outside_seconds"] / side["forwards"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=1000, help="repeats per word (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds", type=int, default=8, help="timed rows per process (default: %(default)s)"
    )
    parser.add_argument(
        "--trials", type=int, default=3, help="process pairs, alternating (default: %(default)s)"
    )
    parser.add_argument(
        "--baseline", default=BASELINE, help="today's code: a commit (default: %(default)s)"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_check

    with tempfile.TemporaryDirectory(prefix="sinklens-overhead-") as folder:
        scratch = Path(folder)
        today = materialise(args.baseline, scratch / "today")
        checkpoint = scratch / "checkpoint"
        gpu_check.build_checkpoint(checkpoint, "dry-run")
        pairs = [
            (
                run(today, checkpoint, args.repeats, args.rounds),
                run(ROOT, checkpoint, args.repeats, args.rounds),
            )
            for _ in range(args.trials)
        ]
    print(
        "Table-1 row on the dry-run model of bench/gpu_check.py (16 layers, d_model 64; 2 words x "
        f"{args.repeats} "
        f"repeats), {args.trials} alternating process pairs, the least disturbed of {args.rounds} "
        "rows each:"
    )
    print(f"  {'':26}{'today (' + args.baseline + ')':>18}{'new (this tree)':>18}")
    rows = (
        ("row, ms", lambda s: 1e3 * s["row_seconds"]),
        ("forward passes, ms", lambda s: 1e3 * s["forward_seconds"]),
        ("outside them, ms", lambda s: 1e3 * s["outside_seconds"]),
        ("forward passes", lambda s: s["forwards"]),
        ("outside per forward, ms", per_forward_ms),
    )
    for label, value in rows:
        old, new = (statistics.median(value(pair[i]) for pair in pairs) for i in (0, 1))
        print(f"  {label:26}{old:>18.2f}{new:>18.2f}")
    cuts = [per_forward_ms(old) / per_forward_ms(new) for old, new in pairs]
    same = all(
        old["row"] == new["row"] and old["forwards"] == new["forwards"] for old, new in pairs
    )
    cut = statistics.median(cuts)
    print(
        f"  overhead cut (today / new, outside per forward): median {cut:.2f}x (range "
        f"{min(cuts):.2f}-"
        f"{max(cuts):.2f}; target >= {TARGET}x); same rows and forward passes: {same}"
    )
    print(
        json.dumps(
            {
                "bench": "overhead",
                "baseline": args.baseline,
                "repeats": args.repeats,
                "trials": args.trials,
                "rounds": args.rounds,
                "today_ms_outside_per_forward": round(
                    statistics.median(per_forward_ms(p[0]) for p in pairs), 3
                ),
                "new_ms_outside_per_forward": round(
                    statistics.median(per_forward_ms(p[1]) for p in pairs), 3
                ),
                "forwards": pairs[0][1]["forwards"],
                "overhead_cut": round(cut, 2),
                "overhead_cut_range": [round(min(cuts), 2), round(max(cuts), 2)],
                "target": f">= {TARGET}",
                "same_results": same,
            }
        )
    )


if __name__ == "__main__":
    main()
