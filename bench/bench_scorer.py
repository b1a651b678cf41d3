"""Cross-check and benchmark: sinklens' multiple-choice scorer against lm-evaluation-harness.

The same items (``--items`` per task, seeded, from the offline benchmark data) are scored by
:func:`sinklens.analyses.benchmarks.score_items` and by the harness's own ``HFLM.loglikelihood``
(the ``sinklens`` model type of :mod:`sinklens.run.harness`, so the same model loading and the
same patch file), both with the patch installed. Prints the largest difference of any choice's
log-likelihood (target: within 1e-4), whether greedy matches agree, and items scored per second
on each side, timed alternately in one process (target: at least 1.5x the harness). The last line is
one JSON object with the figures and targets.

Needs ``pip install 'sinklens[harness]'``. Usage: ``python bench/bench_scorer.py [--patch patch.json]
[--items N] [--tasks arc_easy,hellaswag,...] [--harness-batch N] [--rounds N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--patch",
        default="patch.json",
        help="the patch file (written by `sinklens patch` if missing)",
    )
    parser.add_argument("--items", type=int, default=8)
    parser.add_argument(
        "--tasks", default="arc_easy,arc_challenge,hellaswag,winogrande,piqa,boolq,mmlu,lambada"
    )
    parser.add_argument("--harness-batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if not os.path.exists(args.patch):
        subprocess.run([sys.executable, "-m", "sinklens", "patch", "--out", args.patch], check=True)

    import torch
    from lm_eval.api.instance import Instance

    from sinklens.analyses.benchmarks import score_items
    from sinklens.load.benchmark_items import load_items
    from sinklens.load.registry import DEFAULT_MODEL
    from sinklens.run.harness import harness_model

    torch.set_grad_enabled(False)
    harness = harness_model(
        DEFAULT_MODEL, patch=args.patch, batch_size=args.harness_batch, device="cpu"
    )
    model, tokenizer = harness.model, harness.tokenizer  # the patch is installed on this module
    items = [
        item for task in args.tasks.split(",") for item in load_items(task, args.items, seed=0)
    ]
    pairs = [pair for item in items for pair in zip(item.contexts, item.continuations)]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]

    ours_times, theirs_times = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        ours = score_items(model, tokenizer, items)
        ours_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        theirs = harness.loglikelihood(requests, disable_tqdm=True)
        theirs_times.append(time.perf_counter() - start)

    flat = [(lp, g) for score in ours for lp, g in zip(score.logprob, score.greedy)]
    differences = [abs(a - b[0]) for (a, _), b in zip(flat, theirs)]
    greedy_same = sum(g == b[1] for (_, g), b in zip(flat, theirs))
    worst = max(range(len(differences)), key=differences.__getitem__)
    print(
        f"{len(items)} items ({args.items} per task: {args.tasks}), {len(flat)} choices, patch {args.patch}"
    )
    print(
        f"  largest |log-likelihood difference|: {differences[worst]:.2e} (target <= 1e-4), "
        f"mean {statistics.mean(differences):.2e}; greedy flags agree on {greedy_same} of {len(flat)}"
    )
    ours_s, theirs_s = min(ours_times), min(theirs_times)
    print(f"  sinklens score_items: {len(items) / ours_s:.1f} items/s ({ours_s:.1f} s)")
    print(
        f"  lm-evaluation-harness HFLM.loglikelihood (batch {args.harness_batch}): {len(items) / theirs_s:.1f} items/s "
        f"({theirs_s:.1f} s)"
    )
    print(f"  speed ratio sinklens / harness: {theirs_s / ours_s:.2f}x (target >= 1.5x)")
    print(
        json.dumps(
            {
                "bench": "scorer",
                "items": len(items),
                "choices": len(flat),
                "max_logprob_difference": differences[worst],
                "greedy_agree": greedy_same == len(flat),
                "speed_vs_harness": round(theirs_s / ours_s, 3),
                "targets": {"max_logprob_difference": "<= 1e-4", "speed_vs_harness": ">= 1.5"},
            }
        )
    )


if __name__ == "__main__":
    main()
