"""``sinklens neurons``: the sink layer's neurons ranked, and the sink neurons the ablation filter keeps.

Example: sinklens neurons --top 5
"""

from __future__ import annotations

import argparse

from sinklens.commands import _options as options

HELP = "rank the sink layer's neurons and find the sink neurons by ablation"
TOP = 10  # rows of the ranking printed


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.backend(parser)
    options.neurons(parser)
    options.as_json(parser)
    parser.add_argument(
        "--top",
        type=options.positive(int),
        default=TOP,
        help="rows of the ranking to print (default: %(default)s)",
    )


def run(args: argparse.Namespace) -> None:
    from sinklens.studies.setup import circuit_setup

    settings = options.settings_of(args)
    model = settings.load_model(args.verbose, early_layers_only=True)
    setup = circuit_setup(model, settings.corpus_text(), settings)
    result = setup.neurons
    assert result is not None  # measured: circuit_setup(neurons=True)
    if args.json:
        options.print_json({**setup.summary(), **result.summary()})
        return
    print(result.to_frame().head(args.top).to_string(index=False))
    print(f"first token: {setup.choice.reason}")
    print(
        f"sink neurons ({result.case}): {result.describe_neurons()}; the first token's norm at layer "
        f"{result.sink_layer}: {result.first_token_norm:.4g} -> {result.first_token_norm_ablated:.4g} ablated "
        f"(typical {result.typical_norm:.4g})"
    )
    if result.notebook_neurons is not None:
        print(
            f"the notebook's rule (top 2 of the gate pre-activation at {result.notebook_input}): "
            f"{result.notebook_neurons}"
        )
