"""``sinklens evaluate``: a patch measured on one model, original against patched: benchmarks (the paper's
Table 2), natural text (perplexity, KL), norms and attention, and divergence under generation.

Example: sinklens evaluate --patch patch.json --preset smoke --out sinklens-evaluation
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinklens.commands import _options as options
from sinklens.defaults import EVALUATION_PRESETS
from sinklens.load.registry import DEFAULT_MODEL

HELP = "measure a patch: benchmarks, natural text, norms and divergence, original vs patched"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.placement(parser)
    options.as_json(parser)
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        help=f"the model the patch was found on (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--patch", required=True, help="the patch file `sinklens patch` wrote")
    parser.add_argument(
        "--preset",
        default="smoke",
        choices=tuple(EVALUATION_PRESETS),
        help="smoke: minutes, for CI; full: the report (about an hour for a 135M model on a "
        "CPU) (default: %(default)s)",
    )
    parser.add_argument(
        "--out", default="sinklens-evaluation", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--corpus", help="natural-text file for perplexity and KL (default: Tiny Shakespeare)"
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the benchmark item sample (default: %(default)s)",
    )
    options.verbose(parser)


def run(args: argparse.Namespace) -> None:
    from sinklens.present.evaluation_page import run_evaluation
    from sinklens.studies.evaluation import EvaluationConfig

    config = EvaluationConfig(
        model=args.model,
        patch=args.patch,
        preset=args.preset,
        corpus=args.corpus,
        seed=args.seed,
        dtype=args.dtype,
        device=args.device,
        max_memory=args.max_memory,
    )
    results = run_evaluation(
        config, args.out, progress=True, verbose=args.verbose
    )  # checks before loading
    if args.json:
        options.print_json({k: v for k, v in results.items() if k != "summary"})
        return
    for line in results["summary"]:
        print(line)
    out = Path(args.out).expanduser()
    print(f"wrote {out / 'evaluation.html'} and {out / 'evaluation.json'}")
