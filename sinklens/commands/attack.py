"""``sinklens attack``: the cluster attack (paper Sec. 5): non-repeating sequences of tokens from one
first-layer cluster, against exact repetition and random tokens as controls.

Example: sinklens attack --scan sinklens-scan --patch patch.json
"""

from __future__ import annotations

import argparse

from sinklens.commands import _options as options
from sinklens.defaults import ATTACK_LENGTHS, ATTACK_SEQUENCES, ATTACK_TOKENS, CLUSTERINGS

HELP = "the cluster attack: non-repeating sequences from one first-layer cluster, with controls"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.neurons(parser)
    options.as_json(parser)
    parser.add_argument(
        "--scan",
        help="a scan directory to take tokens and the sink regime from (default: scan "
        "--tokens now, in memory)",
    )
    parser.add_argument(
        "--tokens",
        type=options.token_count,
        help=f"tokens to scan when no --scan is given (default: {ATTACK_TOKENS})",
    )
    options.repeats(parser, "repeats per token of that scan", default=None)
    parser.add_argument(
        "--clustering",
        choices=CLUSTERINGS,
        default=CLUSTERINGS[0],
        help="keys: k-means on layer-0 keys; sink_tokens: the tokens that reach the sink alone "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--lengths",
        type=options.lengths,
        default=ATTACK_LENGTHS,
        help=f"sequence lengths, comma-separated (default: {options.comma_list(ATTACK_LENGTHS)})",
    )
    parser.add_argument(
        "--sequences",
        type=options.positive(int),
        default=ATTACK_SEQUENCES,
        help="sequences per condition and length (default: %(default)s)",
    )
    parser.add_argument(
        "--patch", help="a patch file: measure the cluster sequences with it installed too"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sequences and the clustering"
    )


def run(args: argparse.Namespace) -> None:
    from sinklens.studies.attack import attack_study

    settings = options.settings_of(args)
    result, setup, where = attack_study(
        settings,
        scan=args.scan,
        tokens=args.tokens,
        given=options.given(args),
        clustering=args.clustering,
        lengths=args.lengths,
        n_sequences=args.sequences,
        patch=args.patch,
        seed=args.seed,
        verbose=args.verbose,
        progress=True,
    )
    summary = result.summary()
    if args.json:
        options.print_json({**summary, **where, "setup": setup.to_json(), "seed": args.seed})
        return
    print(
        f"cluster ({args.clustering}): {summary['cluster_size']} tokens, {summary['cluster_sink_share']:.0%} of "
        f"them reach the sink when repeated alone: "
        f"{', '.join(repr(t) for t in summary['cluster_tokens'][:15])}"
    )
    print(summary["definition"])
    print(result.rates().to_string(index=False, float_format=lambda x: f"{x:.3g}"))
