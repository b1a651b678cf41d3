"""``sinklens patching``: an activation-patching sweep of the sink circuit.

Patch each site of one kind (the residual stream before a layer, attention or MLP output per layer and position,
attention heads, or heads per position) from a clean run into a corrupted one of equal length, and measure how
much of a metric comes back: 1 is the clean run's value, 0 the corrupted's. By default the clean run is the
natural text after the first token the model makes a sink, the corrupted run the same text after the candidate
first token it makes least of one, and the metric the first token's norm at the sink layer.

Example: sinklens patching --site heads --metric sink_neurons --json
"""

from __future__ import annotations

import argparse

from sinklens.commands import _options as options
from sinklens.defaults import PATCHING_METRICS, PATCHING_SITES, PATCHING_TOKENS
from sinklens.errors import SinklensError

HELP = "activation patching: which layers, positions and heads carry the sink (a sweep, normalised)"
POSITION_METRICS = ("sink_neurons", "attention")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.neurons(parser)
    options.as_json(parser)
    parser.add_argument(
        "--site",
        choices=PATCHING_SITES,
        default=PATCHING_SITES[0],
        help="what to patch: resid_pre, attn_out or mlp_out per (layer, position); heads per "
        "(layer, head); head_positions per (layer, head, position) (default: %(default)s)",
    )
    parser.add_argument(
        "--metric",
        choices=PATCHING_METRICS,
        default=PATCHING_METRICS[0],
        help="first_token_norm: the first token's norm at the sink layer; sink_neurons: their "
        "activation at --position; attention: the attention layers after the sink layer "
        "pay --position; logit_diff: the clean run's next token against the corrupted "
        "run's (default: %(default)s)",
    )
    parser.add_argument(
        "--position",
        type=options.count,
        help="where the sink_neurons and attention metrics look (default: 0, the first token)",
    )
    parser.add_argument(
        "--clean",
        help="the clean text, read after the sink-making first token (with --corrupted, "
        "of the same token length)",
    )
    parser.add_argument("--corrupted", help="the corrupted text (with --clean)")
    parser.add_argument(
        "--tokens",
        type=options.positive(int),
        default=PATCHING_TOKENS,
        help="tokens of natural text in the default pair (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> None:
    from sinklens.studies.patching import patching_study

    settings = options.settings_of(args)
    if args.position is not None and args.metric not in POSITION_METRICS:
        raise SinklensError(
            f"--position has no effect on the {args.metric} metric",
            f"drop it, or use --metric {' or '.join(POSITION_METRICS)}",
        )
    sweep, setup = patching_study(
        settings,
        site=args.site,
        metric=args.metric,
        position=args.position or 0,
        clean=args.clean,
        corrupted=args.corrupted,
        n_tokens=args.tokens,
        verbose=args.verbose,
        progress=True,
    )
    if args.json:
        options.print_json({**sweep.summary(), "setup": setup.summary()})
        return
    frame = sweep.to_frame()
    columns = "position" if sweep.positions is not None else "head"
    rows = [c for c in ("layer", "head") if c in frame and c != columns]
    table = frame.pivot_table(index=rows, columns=columns, values="restored")
    print(
        f"{sweep.metric}: clean {sweep.clean_value:.4g}, corrupted {sweep.corrupted_value:.4g}; restored by "
        f"patching each {args.site} site (1: clean, 0: corrupted)"
    )
    print(table.to_string(float_format=lambda x: f"{x:.2f}"))
