"""``sinklens sink-layer``: the lone first token's MLP output norm per layer, and the sink layer it gives.

Example: sinklens sink-layer --n-sigma 1.5
"""

from __future__ import annotations

import argparse

from sinklens.commands import _options as options

HELP = "print the first-token MLP norms and the sink layer"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.backend(parser)
    options.as_json(parser)


def run(args: argparse.Namespace) -> None:
    from sinklens.studies.setup import circuit_setup

    settings = options.settings_of(args)
    model = settings.load_model(args.verbose, early_layers_only=True)
    setup = circuit_setup(model, settings.corpus_text(), settings, neurons=False)
    result = setup.sink
    if args.json:
        options.print_json({**setup.summary(), "sink_layer_detail": result.summary()})
        return
    print(result.to_frame().to_string(index=False))
    print(f"first token: {setup.choice.reason}")
    print(f"sink layer: {result.sink_layer} ({result.method})")
