"""``sinklens patch``: measure the paper's clamp of the sink neurons and its variants, and write the chosen
patch as JSON (for ``sinklens evaluate``, and to install on a model).

Example: sinklens patch --out patch.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sinklens.commands import _options as options
from sinklens.defaults import PATCH_HOOKS, PATCH_VALUES
from sinklens.errors import SinklensError

HELP = "measure the paper's clamp and its variants, and write the chosen patch as JSON"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.words(parser)
    options.neurons(parser)
    options.as_json(parser)
    parser.add_argument(
        "--out", default="patch.json", help="the patch file to write (default: %(default)s)"
    )
    parser.add_argument(
        "--hook", choices=tuple(PATCH_HOOKS), help="measure only this hook point (default: all)"
    )
    parser.add_argument(
        "--value", choices=PATCH_VALUES, help="measure only this value (default: both)"
    )


def run(args: argparse.Namespace) -> None:
    from sinklens._io import check_output_dir
    from sinklens.studies.patch_search import find_sink_patch

    settings = options.settings_of(args)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise SinklensError(
            f"{out} is a directory", "pass a file name for the patch, e.g. --out patch.json"
        )
    check_output_dir(out.parent)
    result, setup = find_sink_patch(
        settings,
        hooks=[args.hook] if args.hook else tuple(PATCH_HOOKS),
        values=[args.value] if args.value else PATCH_VALUES,
        verbose=args.verbose,
    )
    patch = result.patch
    patch.save(out)
    if args.json:
        options.print_json({"patch": str(out), **patch.to_json(), "setup": setup.summary()})
        return
    print(result.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"chosen: {patch.describe()}")
    print(f"why: {result.reason}")
    print(f"wrote {out}")
