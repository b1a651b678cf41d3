"""``sinklens report``: every analysis on one model, as ``report.html`` and ``results.json``.

Example: sinklens report --out sinklens-report
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinklens.commands import _options as options

HELP = "write report.html and results.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.words(parser)
    options.neurons(parser)
    parser.add_argument(
        "--out", default="sinklens-report", help="output directory (default: %(default)s)"
    )
    parser.add_argument(
        "--sink-layer", type=int, help="measure the norm curves at this layer instead"
    )


def run(args: argparse.Namespace) -> None:
    from sinklens._io import check_output_dir
    from sinklens.present.report_page import run_report

    settings = options.settings_of(args)
    check_output_dir(args.out)  # before the model loads
    model = settings.load_model(args.verbose)
    results = run_report(settings, args.out, model=model, progress=True)
    for line in results["summary"]:
        print(line)
    print(f"wrote {Path(args.out) / 'report.html'} and {Path(args.out) / 'results.json'}")
