"""``sinklens sinks``: the sink census: every sink in a text, not only the first: where each appears, how
long it lasts, the attention it takes and the neurons that write it.

Example: sinklens sinks --chat conversation.json --json
"""

from __future__ import annotations

import argparse

from sinklens.commands import _options as options

HELP = (
    "every sink in a text, not only the first: where each appears, how long it lasts, the attention it "
    "takes and the neurons that write it"
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.backend(parser)
    options.neurons(parser)
    options.as_json(parser)
    given = parser.add_mutually_exclusive_group()
    given.add_argument(
        "--text",
        help="a text file, read after the first token (default: the natural text, the "
        "first --corpus-chars characters of --corpus)",
    )
    given.add_argument(
        "--chat",
        help='a JSON list of messages ({"role": ..., "content": ...}), formatted '
        "with the model's own chat template",
    )


def run(args: argparse.Namespace) -> None:
    from sinklens.studies.census import census_of

    settings = options.settings_of(args)
    census = census_of(
        settings, text=args.text, chat=args.chat, verbose=args.verbose, progress=True
    )
    if args.json:
        options.print_json(census.summary())
        return
    print(
        f"{len(census.sinks)} sinks in {census.label} ({census.tokens.shape[1]} tokens); first token: "
        f"{census.setup.choice.reason}"
    )
    if census.sinks:
        print(census.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4g}"))
