"""The ``sinklens`` command line: one command per module of :mod:`sinklens.commands`.

Every command follows the same rules: arguments that can be checked without a model are checked before it is
loaded, and the rest before the first forward pass; bad input ends with one line ``sinklens: error:
<problem>. Fix: <what to do>`` and exit status 2, after any progress bar is closed; other libraries'
progress bars and notices stay hidden unless ``--verbose``. ``--help`` and argument errors answer before
torch or TransformerLens is imported.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys
from importlib.metadata import version
from types import ModuleType

from sinklens import commands
from sinklens.commands._options import Parser
from sinklens.errors import SinklensError

DESCRIPTION = "Find, explain and patch the attention-sink circuit behind repeated-token divergence."
DOCS = "docs/usage.md (commands, API, results.json) and docs/methods.md in the sinklens source"


def command_modules() -> dict[str, ModuleType]:
    """Every command, by name: the public modules of :mod:`sinklens.commands`, in alphabetical order."""
    names = sorted(
        m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")
    )
    return {
        name.replace("_", "-"): importlib.import_module(f"sinklens.commands.{name}")
        for name in names
    }


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each command's own parser is ``args.command_parser`` after parsing."""
    parser = Parser(
        prog="sinklens",
        description=DESCRIPTION,
        epilog=f"`sinklens COMMAND --help` for a command's options; docs: {DOCS}",
    )
    parser.add_argument("--version", action="version", version=f"sinklens {version('sinklens')}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=Parser, metavar="COMMAND"
    )
    for name, module in command_modules().items():
        description = (module.__doc__ or "").replace("``", "`")
        command = sub.add_parser(
            name,
            help=module.HELP,
            description=description,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(command)
        command.set_defaults(run=module.run, command_parser=command)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, --version, or a usage error already printed as one line
        return int(exit_.code or 0)
    _show_sinklens_messages()
    try:
        args.run(args)
    except SinklensError as exc:
        _close_bars()
        print(f"sinklens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_bars()
        print(
            "sinklens: interrupted; what was written is kept, and the same command resumes from it",
            file=sys.stderr,
        )
        return 130
    return 0


def _close_bars() -> None:
    """Close open progress bars, so that a message does not land on a bar's line."""
    if "tqdm" not in sys.modules:  # nothing has drawn a bar
        return
    from tqdm.std import tqdm

    for bar in list(tqdm._instances):
        bar.close()


class _NoticeHandler(logging.StreamHandler):
    """Writes ``sinklens: <message>`` to whatever ``sys.stderr`` is at the time."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("sinklens: %(message)s"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _show_sinklens_messages() -> None:
    """Print the library's one-line notices (first download, first conversion) on stderr."""
    logger = logging.getLogger("sinklens")
    if not any(isinstance(h, _NoticeHandler) for h in logger.handlers):
        logger.addHandler(_NoticeHandler())
    logger.setLevel(logging.INFO)


if __name__ == "__main__":
    sys.exit(main())
