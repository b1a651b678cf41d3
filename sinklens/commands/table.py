"""``sinklens table``: the paper's Table 1, a row per model (sink layer, sink neurons, repeats to the sink).

One model prints its row; several (``--model`` again), ``--out`` or ``--ray`` keep each model's row in a
directory as it is measured, so a rerun measures only the models missing.

Example: sinklens table --model smollm2-135m-instruct --model gemma-3-270m --out sinklens-table
"""

from __future__ import annotations

import argparse

from sinklens.commands import _options as options
from sinklens.defaults import RAY_LOCAL
from sinklens.errors import SinklensError
from sinklens.load.registry import DEFAULT_MODEL

HELP = "the paper's Table 1: a row per model (sink layer, sink neurons, repeats to the sink)"
DEFAULT_OUT = "sinklens-table"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser, several_models=True)
    options.backend(parser)
    options.words(parser)
    options.neurons(parser)
    options.as_json(parser)
    options.on_ray(parser, RAY_LOCAL)
    parser.add_argument(
        "--out",
        help="keep each model's row in this directory, so a rerun measures only the "
        f"models missing (default with several models or --ray: {DEFAULT_OUT})",
    )


def run(args: argparse.Namespace) -> None:
    from sinklens.studies.sweep import PartFailed, row_summary, table_sweep
    from sinklens.studies.table import SinkTableRow, sink_table_row

    every = [
        options.settings_of(args, model) for model in dict.fromkeys(args.model or [DEFAULT_MODEL])
    ]
    if len(every) == 1 and args.out is None and args.ray is None:
        settings = every[0]
        model = settings.load_model(args.verbose, early_layers_only=True)
        row = sink_table_row(model, settings.corpus_text(), settings, progress=True)
        if args.json:
            options.print_json(row.summary())
            return
        print(row.to_frame().to_string(index=False))
        print(f"first token: {row.choice.reason}")
        return
    out = args.out or DEFAULT_OUT
    rows = table_sweep(every, out, ray=args.ray)
    done = [row for row in rows if isinstance(row, SinkTableRow)]
    failed = [row for row in rows if isinstance(row, PartFailed)]
    if args.json:
        summaries = [row_summary(row) for row in rows]
        options.print_json({"rows": summaries} if len(rows) > 1 else summaries[0])
    else:
        if done:
            import pandas as pd

            print(pd.concat([row.to_frame() for row in done]).to_string(index=False))
        for part in failed:
            print(f"{part.name}: {part.error}")
        print(f"wrote {out}/table.json")
    if failed:
        raise SinklensError(
            f"{len(failed)} of {len(rows)} models have no row ({', '.join(r.name for r in failed)})",
            "see each model's error above; the rows measured are kept, and the same command "
            "measures only what is missing",
        )
