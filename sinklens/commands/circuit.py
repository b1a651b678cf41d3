"""``sinklens circuit``: how the model marks the first token, the first-layer circuit of the paper (Sec. 4.3).

The "detect others" heads of the first attention layer (a head that sees only its own token marks it as
first), the path of that mark to the sink neurons (activation patching between the lone first token and the
same token after text), the first-detector neurons, a linear probe of first vs. later tokens per layer, and
the convergence of a long run of one token to the lone token.

Example: sinklens circuit --contexts 8 --json
"""

from __future__ import annotations

import argparse

from sinklens.commands import _options as options
from sinklens.defaults import MARK_CONTEXTS
from sinklens.errors import SinklensError

HELP = (
    "how the model marks the first token: heads, path to the sink neurons, probe, first-detector neurons, "
    "convergence"
)
HEAD_COLUMNS = (
    "head",
    "self_attention",
    "uniform_self",
    "self_score_gap",
    "necessity",
    "necessity_placebo",
    "in_context",
    "in_context_placebo",
    "detect_others",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.words(parser)
    options.neurons(parser)
    options.as_json(parser)
    parser.add_argument(
        "--contexts",
        type=options.positive(int),
        default=None,
        help=f"corrupted runs per patching experiment (default: {MARK_CONTEXTS})",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the probe's split and the placebos (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> None:
    from sinklens.studies.circuit import first_layer_circuit

    settings = options.settings_of(args)
    if args.contexts is not None and args.contexts < 2:
        raise SinklensError(
            f"--contexts {args.contexts} is too few", "pass at least 2 corrupted runs"
        )
    model = settings.load_model(args.verbose, early_layers_only=True)
    result = first_layer_circuit(
        model,
        settings.corpus_text(),
        settings,
        n_contexts=args.contexts,
        seed=args.seed,
        progress=True,
    )
    summary = result.summary()
    if args.json:
        options.print_json({**summary, "contexts": args.contexts, "seed": args.seed})
        return
    print(f"first token: {summary['first_token']['chosen_by']}")
    print(f"sink neurons: {summary['sink_neurons']} (sink layer {summary['sink_layer']})")
    dependence = summary["first_token_dependence"]
    if not dependence["mark_traced"]:
        print(
            f"no first-token mark to trace: the sink neurons fire as much on the first token after text "
            f"(text removes {dependence['share_removed_by_text']:.1%} of their activation): the model makes "
            "a sink of the token wherever it stands"
        )
    print(
        f"detect-others heads (layer 0 heads the sink neurons need): "
        f"{summary['detect_others_heads'] or 'none'}"
    )
    heads = result.to_frame()
    columns = [c for c in HEAD_COLUMNS if c in heads]
    print(heads[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"path of the first-token mark to the sink neurons: {' -> '.join(summary['paths']) or 'none found'}"
    )
    probe = ", ".join(
        f"{p['layer']}: {p['balanced_accuracy']:.3f} / {p['first_share_on_repeats']:.2f}"
        for p in summary["probe"]
    )
    print(
        f"probe per layer (held-out balanced accuracy / share of {summary['repeat_word']!r} repeats called "
        f"first): {probe}"
    )
    detectors = ", ".join(
        f"L{n['layer']}.{n['neuron']} ({n['separation']:.3f})"
        for n in summary["first_detector_neurons"][:5]
    )
    print(f"first-detector neurons (separation of position 0 from 1-2): {detectors}")
    slopes = ", ".join(f"{w['word']!r} {w['slope']:.2f}" for w in summary["convergence"])
    print(f"convergence to the lone token, log-log slope (softmax leakage predicts -1): {slopes}")
