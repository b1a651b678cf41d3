"""What the commands share: the one-line usage error, the argument types, the option groups, and the
:class:`~sinklens.settings.Settings` a command's arguments make.

Everything here is plain Python: a command parses and checks its arguments before torch, TransformerLens
or a model is imported, so ``--help`` and a bad argument answer at once. Defaults come from the library's
own names (:mod:`sinklens.settings`, :mod:`sinklens.defaults`), never from literals copied here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from sinklens.errors import SinklensError
from sinklens.load.registry import DEFAULT_MODEL, MODEL_ALIASES
from sinklens.load.sources import (
    BACKENDS,
    DTYPE_NAMES,
    MAX_MEMORY_EXAMPLE,
    REMOTE_TIMEOUT,
    parse_max_memory,
)
from sinklens.settings import (
    AUTO,
    CRITERIA,
    DEFAULT_REPEATS,
    MAX_NEURONS,
    MIN_SINK_RATIO,
    PAPER_CORPUS_CHARS,
    PAPER_MAX_LAYER,
    PAPER_N_SIGMA,
    REMOVED_SHARE,
    Settings,
)

SETTINGS_FIELDS = tuple(
    field.name for field in dataclasses.fields(Settings) if field.name != "model"
)


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sinklens: error: {message}. Fix: see `{self.prog} --help`\n")


# Argument types: each turns a string into a value or refuses it in words a user can act on.


def first_token(value: str) -> str | int:
    """A token id, or a word (``bos``, ``eos``, ``auto`` or any single-token word)."""
    return int(value) if value.lstrip("-").isdigit() else value


def layers(value: str) -> list[int]:
    """``11``, ``3-8`` or ``3,4,5``."""
    try:
        if "-" in value.strip("-"):
            start, end = (int(v) for v in value.split("-", 1))
            parsed = list(range(start, end + 1))
        else:
            parsed = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a layer, a range like 3-8 or a list like 3,4,5"
        ) from None
    if not parsed:
        raise argparse.ArgumentTypeError(f"the layer range {value!r} is empty")
    if min(parsed) < 0:
        raise argparse.ArgumentTypeError(f"{value!r} has a negative layer; layers are 0-based")
    return parsed


def number(kind: type, accept: Callable[[float], bool], what: str) -> Callable[[str], Any]:
    """A parser of ``kind`` numbers that refuses a value ``accept`` rejects, saying it is not ``what``."""

    def parse(value: str) -> Any:
        parsed = kind(value)
        if not accept(parsed):
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return parsed

    parse.__name__ = kind.__name__
    return parse


def positive(kind: type) -> Callable[[str], Any]:
    return number(kind, lambda n: n > 0, "a positive number")


count = number(int, lambda n: n >= 0, "a count (it is negative)")
share = number(float, lambda n: 0 <= n <= 1, "a number in 0..1")
removed_share = number(float, lambda n: 0 < n <= 1, "a share in (0, 1]")
non_negative = number(float, lambda n: n >= 0, "0 or more (a threshold below the mean)")
above_one = number(
    float, lambda n: n > 1, "above 1 (a first token no larger than typical is no sink)"
)


def token_count(value: str) -> int | None:
    """``all`` (None) or a positive count."""
    return None if value == "all" else positive(int)(value)


def token_ids(value: str) -> list[int]:
    """``5,17,999`` or ``@FILE`` (one id per line)."""
    text = value
    if value.startswith("@"):
        try:
            text = Path(value[1:]).read_text(encoding="utf-8").replace("\n", ",")
        except OSError as exc:
            raise argparse.ArgumentTypeError(f"cannot read {value[1:]}: {exc.strerror}") from None
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a list of token ids like 5,17,999"
        ) from None


def shard(value: str) -> tuple[int, int]:
    """``i/n``, 1-based like every i/n on a command line, so a job array's ``$SLURM_ARRAY_TASK_ID/N`` fits."""
    try:
        index, total = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a shard like 1/4") from None
    if not 1 <= index <= total:
        raise argparse.ArgumentTypeError(
            f"shard {value}: the index must be in 1..{total} (shards are numbered from 1)"
        )
    return index, total


def lengths(value: str) -> tuple[int, ...]:
    """``100,300``: sequence lengths of at least 2."""
    try:
        parsed = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a list of lengths like 100,300"
        ) from None
    if not parsed or min(parsed) < 2:
        raise argparse.ArgumentTypeError(f"{value!r}: every length must be at least 2")
    return parsed


def max_memory(value: str) -> str:
    """``0=20GiB,cpu=64GiB``, checked (the text is kept: the settings record it as given)."""
    try:
        parse_max_memory(value)
    except SinklensError as exc:
        raise argparse.ArgumentTypeError(str(exc).split(". Fix:")[0]) from None
    return value


def comma_list(values: tuple | list) -> str:
    """A default sequence as a user would type it: ``100,300,1000``."""
    return ",".join(str(v) for v in values)


# Option groups: each adds the options of one concern to a command's parser.


def placement(parser: argparse.ArgumentParser) -> None:
    """Where the model runs and in what precision."""
    parser.add_argument(
        "--dtype",
        choices=DTYPE_NAMES,
        help="precision of the weights and activations; statistics are float32 whatever it is "
        "(default: float32 on the CPU, the checkpoint's own dtype on a GPU)",
    )
    parser.add_argument(
        "--device",
        help="cpu, cuda, cuda:N, or auto (every GPU, split by accelerate's device "
        "map) (default: the first GPU, else the CPU)",
    )
    parser.add_argument(
        "--max-memory",
        type=max_memory,
        metavar="DEVICE=SIZE,...",
        help=f"with --device auto: the most accelerate's device map puts on each device, GPUs by index, "
        f"then cpu and disk, e.g. {MAX_MEMORY_EXAMPLE} (default: as much as each has)",
    )


def backend(parser: argparse.ArgumentParser) -> None:
    """How the model runs: a TransformerBridge here, or nnsight traces, here or on an NDIF server."""
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default=BACKENDS[0],
        help="run the model as a TransformerBridge (default) or as nnsight traces, which give the same "
        "numbers and can run remotely (--remote)",
    )
    parser.add_argument(
        "--remote",
        action="store_true",
        help="with --backend nnsight: run on NDIF (key: NDIF_API_KEY); --model is then a model the "
        "host serves, e.g. meta-llama/Llama-2-7b-hf",
    )
    parser.add_argument(
        "--host",
        help="with --remote: the NDIF server, e.g. http://localhost:8001 for a self-hosted one "
        "(default: NDIF_HOST, else NDIF)",
    )
    parser.add_argument(
        "--remote-timeout",
        type=positive(float),
        default=REMOTE_TIMEOUT,
        metavar="SECONDS",
        help="with --remote: the longest one remote job may take, queueing included (default: %(default)s)",
    )


def verbose(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--verbose", action="store_true", help="show other libraries' progress bars and notices"
    )


def study(parser: argparse.ArgumentParser, *, several_models: bool = False) -> None:
    """The model, the first token, the sink-layer rule and the natural text: every study's setup."""
    placement(parser)
    several = "; give it once per model, a row each" if several_models else ""
    parser.add_argument(
        "--model",
        action="append",
        help=f"alias ({', '.join(MODEL_ALIASES)}), .gguf file, HF directory or hub name"
        f"{several} (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--first-token",
        type=first_token,
        default=AUTO,
        help="token at position 0: auto (default: the tokenizer's BOS if the model makes it a "
        "sink, else the candidate it does), bos, eos, a token id, or a word",
    )
    parser.add_argument(
        "--max-layer",
        type=positive(int),
        default=PAPER_MAX_LAYER,
        help="search layers 0..max-layer-1 for the sink layer (default: %(default)s)",
    )
    parser.add_argument(
        "--n-sigma",
        type=non_negative,
        default=PAPER_N_SIGMA,
        help="sink layer threshold: mean + n-sigma * std (default: %(default)s)",
    )
    parser.add_argument(
        "--corpus",
        help="natural-text file for the typical norm (default: Tiny Shakespeare's opening)",
    )
    parser.add_argument(
        "--corpus-chars",
        type=positive(int),
        default=PAPER_CORPUS_CHARS,
        help="characters of the corpus to use (default: %(default)s)",
    )
    parser.add_argument(
        "--min-ratio",
        type=above_one,
        default=MIN_SINK_RATIO,
        help="a first token is a sink at this multiple of the typical norm (default: %(default)s)",
    )
    verbose(parser)


def words(parser: argparse.ArgumentParser) -> None:
    """The repeated words and how often they repeat."""
    parser.add_argument(
        "--words",
        nargs="+",
        help="single-token words to repeat (default: the tokens of 'Another one bites the dust')",
    )
    repeats(parser, "repeats per word")


def repeats(
    parser: argparse.ArgumentParser, what: str, default: int | None = DEFAULT_REPEATS
) -> None:
    shown = "%(default)s" if default is not None else str(DEFAULT_REPEATS)
    parser.add_argument(
        "--n-repeats", type=positive(int), default=default, help=f"{what} (default: {shown})"
    )


def neurons(parser: argparse.ArgumentParser) -> None:
    """The sink-neuron search and its ablation filter."""
    parser.add_argument(
        "--layers",
        type=layers,
        help="layers to search for sink neurons: 11, 3-8 or 3,4,5 (default: decided from the data)",
    )
    parser.add_argument(
        "--criterion",
        choices=CRITERIA,
        default=CRITERIA[0],
        help="ranking: the paper's neuron output at the first token, or the notebook's gate "
        "pre-activation at the last repeat (default: %(default)s)",
    )
    parser.add_argument(
        "--share",
        type=removed_share,
        default=REMOVED_SHARE,
        help="share of the first token's excess norm the sink neurons' ablation must remove "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--max-neurons",
        type=positive(int),
        default=MAX_NEURONS,
        help="candidates the filter tries (default: %(default)s)",
    )


def as_json(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def on_ray(parser: argparse.ArgumentParser, local: str) -> None:
    parser.add_argument(
        "--ray",
        nargs="?",
        const=local,
        metavar="ADDRESS",
        help="run the parts as Ray tasks (needs sinklens[ray]): on the cluster at ADDRESS "
        "(HOST:PORT, ray://HOST:PORT or auto), or on a new local instance without one",
    )


# What a command's arguments make.


def settings_of(args: argparse.Namespace, model: str | None = None) -> Settings:
    """The checked settings of a command for ``model`` (default: its only --model, or the default model)."""
    models = args.model or [DEFAULT_MODEL]
    if model is None and len(models) > 1:
        raise SinklensError(
            f"`sinklens {args.command}` takes one --model, got {len(models)}",
            "pass one --model (only `sinklens table` makes a row per model)",
        )
    given = {
        field: getattr(args, field)
        for field in SETTINGS_FIELDS
        if getattr(args, field, None) is not None
    }
    settings = Settings(**{**given, "model": model or models[0]})
    settings.check()
    return settings


def given(args: argparse.Namespace) -> set[str]:
    """The options of the command line that hold other values than their defaults."""
    parser: argparse.ArgumentParser = args.command_parser
    return {
        a.dest
        for a in parser._actions
        if a.dest in vars(args) and getattr(args, a.dest) != a.default
    }


def print_json(data: dict) -> None:
    print(json.dumps(data))
