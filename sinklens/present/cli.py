"""The ``sinklens`` command: ``report`` for the whole study, one command per analysis otherwise.

Every command follows the same rules: arguments that can be checked without a model are checked
before it is loaded, and the rest before the first forward pass; bad input ends with one line
``sinklens: error: <problem>. Fix: <what to do>`` and exit status 2, after any progress bar is
closed; other libraries' progress bars and notices stay hidden unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from sinklens._io import check_output_dir, write_json, write_text
from sinklens.errors import SinklensError
from sinklens.load.registry import DEFAULT_MODEL, MODEL_ALIASES
from sinklens.load.sources import DTYPE_NAMES
from sinklens.settings import (
    ATTACK_TOKENS,
    AUTO,
    CLUSTERINGS,
    CRITERIA,
    DEFAULT_REPEATS,
    EVALUATION_PRESETS,
    MAX_NEURONS,
    MIN_SINK_RATIO,
    PAPER_CORPUS_CHARS,
    PAPER_MAX_LAYER,
    PAPER_N_SIGMA,
    PATCH_HOOKS,
    PATCH_VALUES,
    RAY_LOCAL,
    REMOVED_SHARE,
    SCAN_BATCH,
    SCREEN_CALIBRATION,
    SCREEN_REPEATS,
    SCREEN_THRESHOLD,
    Settings,
)

SETTINGS_FIELDS = tuple(field.name for field in dataclasses.fields(Settings) if field.name != "model")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line like every other error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"sinklens: error: {message}. Fix: see `{self.prog} --help`\n")


def _first_token(value: str) -> str | int:
    return int(value) if value.lstrip("-").isdigit() else value


def _layers(value: str) -> list[int]:
    """``11``, ``3-8`` or ``3,4,5``."""
    try:
        if "-" in value.strip("-"):
            start, end = (int(v) for v in value.split("-", 1))
            layers = list(range(start, end + 1))
        else:
            layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a layer, a range like 3-8 or a list like 3,4,5") from None
    if not layers:
        raise argparse.ArgumentTypeError(f"the layer range {value!r} is empty")
    if min(layers) < 0:
        raise argparse.ArgumentTypeError(f"{value!r} has a negative layer; layers are 0-based")
    return layers


def _number(kind: type, accept: Callable[[float], bool], what: str) -> Callable[[str], int | float]:
    """A parser of ``kind`` numbers that refuses a value ``accept`` rejects, saying it is not ``what``."""
    def parse(value: str):
        number = kind(value)
        if not accept(number):
            raise argparse.ArgumentTypeError(f"{value} is not {what}")
        return number

    parse.__name__ = kind.__name__
    return parse


def _positive(kind: type) -> Callable[[str], int | float]:
    return _number(kind, lambda n: n > 0, "a positive number")


_count = _number(int, lambda n: n >= 0, "a count (it is negative)")
_share = _number(float, lambda n: 0 <= n <= 1, "a number in 0..1")
_removed_share = _number(float, lambda n: 0 < n <= 1, "a share in (0, 1]")
_non_negative = _number(float, lambda n: n >= 0, "0 or more (a threshold below the mean)")
_above_one = _number(float, lambda n: n > 1, "above 1 (a first token no larger than typical is no sink)")


def _token_count(value: str) -> int | None:
    """``all`` (None) or a positive count."""
    return None if value == "all" else _positive(int)(value)


def _token_ids(value: str) -> list[int]:
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
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of token ids like 5,17,999") from None


def _shard(value: str) -> tuple[int, int]:
    """``i/n``, 1-based like every i/n on a command line, so a job array's ``$SLURM_ARRAY_TASK_ID/N`` fits."""
    try:
        index, count = (int(v) for v in value.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a shard like 1/4") from None
    if not 1 <= index <= count:
        raise argparse.ArgumentTypeError(f"shard {value}: the index must be in 1..{count} (shards are numbered from 1)")
    return index, count


def _lengths(value: str) -> tuple[int, ...]:
    try:
        lengths = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a list of lengths like 100,300") from None
    if not lengths or min(lengths) < 2:
        raise argparse.ArgumentTypeError(f"{value!r}: every length must be at least 2")
    return lengths


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="sinklens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    placement = argparse.ArgumentParser(add_help=False)
    placement.add_argument("--dtype", default="float32", choices=DTYPE_NAMES,
                           help="precision of the weights and activations; statistics are float32 whatever it is "
                                "(default: %(default)s)")
    placement.add_argument("--device", help="cpu, cuda, cuda:N, or auto (every GPU, split by accelerate's device map) "
                                            "(default: the first GPU, else the CPU)")
    common = argparse.ArgumentParser(add_help=False, parents=[placement])
    common.add_argument("--model", action="append",
                        help=f"alias ({', '.join(MODEL_ALIASES)}), .gguf file, HF directory or hub name; `table` takes "
                             f"it several times, a row per model (default: {DEFAULT_MODEL})")
    common.add_argument("--first-token", type=_first_token, default=AUTO,
                        help="token at position 0: auto (default: the tokenizer's BOS if the model makes it a sink, "
                             "else the candidate it does), bos, eos, a token id, or a word")
    common.add_argument("--max-layer", type=_positive(int), default=PAPER_MAX_LAYER,
                        help="search layers 0..max-layer-1 for the sink layer (default: %(default)s)")
    common.add_argument("--n-sigma", type=_non_negative, default=PAPER_N_SIGMA,
                        help="sink layer threshold: mean + n-sigma * std (default: %(default)s)")
    common.add_argument("--corpus", help="natural-text file for the typical norm (default: Tiny Shakespeare's opening)")
    common.add_argument("--corpus-chars", type=_positive(int), default=PAPER_CORPUS_CHARS,
                        help="characters of the corpus to use (default: %(default)s)")
    common.add_argument("--min-ratio", type=_above_one, default=MIN_SINK_RATIO,
                        help="a first token is a sink at this multiple of the typical norm (default: %(default)s)")
    common.add_argument("--verbose", action="store_true", help="show other libraries' progress bars and notices")

    words = argparse.ArgumentParser(add_help=False)
    words.add_argument("--words", nargs="+", help="single-token words to repeat (default: the tokens of "
                                                  "'Another one bites the dust')")
    words.add_argument("--n-repeats", type=_positive(int), default=1000, help="repeats per word (default: %(default)s)")

    neurons = argparse.ArgumentParser(add_help=False)
    neurons.add_argument("--layers", type=_layers,
                         help="layers to search for sink neurons: 11, 3-8 or 3,4,5 (default: decided from the data)")
    neurons.add_argument("--criterion", choices=CRITERIA, default="paper",
                         help="ranking: the paper's neuron output at the first token, or the notebook's gate "
                              "pre-activation at the last repeat (default: %(default)s)")
    neurons.add_argument("--share", type=_removed_share, default=REMOVED_SHARE,
                         help="share of the first token's excess norm the sink neurons' ablation must remove "
                              "(default: %(default)s)")
    neurons.add_argument("--max-neurons", type=_positive(int), default=MAX_NEURONS,
                         help="candidates the filter tries (default: %(default)s)")
    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    report = sub.add_parser("report", parents=[common, words, neurons], help="write report.html and results.json")
    report.add_argument("--out", default="sinklens-report", help="output directory (default: %(default)s)")
    report.add_argument("--sink-layer", type=int, help="measure the norm curves at this layer instead")
    on_ray = argparse.ArgumentParser(add_help=False)
    on_ray.add_argument("--ray", nargs="?", const=RAY_LOCAL, metavar="ADDRESS",
                        help="run the parts as Ray tasks (needs sinklens[ray]): on the cluster at ADDRESS "
                             "(HOST:PORT, ray://HOST:PORT or auto), or on a new local instance without one")
    table = sub.add_parser("table", parents=[common, words, neurons, as_json, on_ray],
                           help="the paper's Table 1: a row per model (sink layer, sink neurons, repeats to the sink)")
    table.add_argument("--out", help="keep each model's row in this directory, so a rerun measures only the models "
                                     "missing (default with several models or --ray: sinklens-table)")
    ranked = sub.add_parser("neurons", parents=[common, neurons, as_json],
                            help="rank the sink layer's neurons and find the sink neurons by ablation")
    ranked.add_argument("--top", type=_positive(int), default=10, help="rows of the ranking to print (default: %(default)s)")
    sub.add_parser("sink-layer", parents=[common, as_json], help="print the first-token MLP norms and the sink layer")
    patch = sub.add_parser("patch", parents=[common, words, neurons, as_json],
                           help="measure the paper's clamp and its variants, and write the chosen patch as JSON")
    patch.add_argument("--out", default="patch.json", help="the patch file to write (default: %(default)s)")
    patch.add_argument("--hook", choices=tuple(PATCH_HOOKS), help="measure only this hook point (default: all)")
    patch.add_argument("--value", choices=PATCH_VALUES, help="measure only this value (default: both)")
    evaluate = sub.add_parser("evaluate", parents=[placement, as_json], help="measure a patch: benchmarks, natural text, norms and divergence, "
                                               "original vs patched")
    evaluate.add_argument("--model", default=DEFAULT_MODEL, help=f"the model the patch was found on (default: {DEFAULT_MODEL})")
    evaluate.add_argument("--patch", required=True, help="the patch file `sinklens patch` wrote")
    evaluate.add_argument("--preset", default="smoke", choices=tuple(EVALUATION_PRESETS),
                          help="smoke: minutes, for CI; full: the report (about an hour for a 135M model on a CPU) "
                               "(default: %(default)s)")
    evaluate.add_argument("--out", default="sinklens-evaluation", help="output directory (default: %(default)s)")
    evaluate.add_argument("--corpus", help="natural-text file for perplexity and KL (default: Tiny Shakespeare)")
    evaluate.add_argument("--seed", type=int, default=0, help="seed of the benchmark item sample (default: %(default)s)")
    evaluate.add_argument("--verbose", action="store_true", help="show other libraries' progress bars and notices")
    scan = sub.add_parser("scan", parents=[common, neurons, as_json, on_ray],
                          help="repeat every token (or a stratified sample) and measure which reach the sink")
    scan.add_argument("--out", default="sinklens-scan", help="output directory, shared by shards (default: %(default)s)")
    scan.add_argument("--tokens", type=_token_count, default=2000,
                      help="N tokens in a seeded sample stratified by token id, or all (default: %(default)s)")
    scan.add_argument("--token-ids", type=_token_ids,
                      help="scan this subset instead: comma-separated token ids, or @FILE with one id per line")
    scan.add_argument("--n-repeats", type=_positive(int), default=1000, help="repeats per token (default: %(default)s)")
    scan.add_argument("--shard", type=_shard, default=(1, 1),
                      help="i/n (1-based): scan every n-th token from the i-th, as one of n independent jobs (a Slurm "
                           "array --array=1-N runs --shard $SLURM_ARRAY_TASK_ID/N); a run without --shard scans what "
                           "is missing and merges (default: 1/1)")
    scan.add_argument("--shards", type=_positive(int),
                      help="with --ray: the number of shard tasks (default: one per GPU of the cluster, else one "
                           "per two CPUs)")
    scan.add_argument("--exhaustive", action="store_true",
                      help="run every token in full, with no screen (default: screen every token with a short run, "
                           "then run the screen positives and a calibration sample in full)")
    scan.add_argument("--screen-repeats", type=_positive(int), default=SCREEN_REPEATS,
                      help="repeats of the screen's short run (default: %(default)s)")
    scan.add_argument("--screen-threshold", type=_share, default=SCREEN_THRESHOLD,
                      help="a token is a screen positive when its short run's peak norm goes this far from typical "
                           "toward the first token's norm, in log space (0..1; the sink regime is 0.9) "
                           "(default: %(default)s)")
    scan.add_argument("--calibration", type=_count, default=SCREEN_CALIBRATION,
                      help="tokens of the request, drawn at random, run in full whatever the screen says: they "
                           "measure the screen's recall (default: %(default)s)")
    scan.add_argument("--positives", type=_share, default=1.0,
                      help="share of the screen positives run in full, drawn at random: below 1 trades a wider "
                           "interval for time (default: %(default)s, all)")
    scan.add_argument("--batch-size", type=_positive(int), default=SCAN_BATCH, help="tokens per forward pass "
                                                                                   "(default: %(default)s)")
    scan.add_argument("--prefix", default="", help="text between the first token and the repeats (default: none)")
    scan.add_argument("--seed", type=int, default=0, help="seed of the token sample (default: %(default)s)")
    attack = sub.add_parser("attack", parents=[common, neurons, as_json],
                            help="the cluster attack: non-repeating sequences from one first-layer cluster, with "
                                 "controls")
    attack.add_argument("--scan", help="a scan directory to take tokens and the sink regime from (default: scan "
                                       "--tokens now, in memory)")
    attack.add_argument("--tokens", type=_token_count,
                        help=f"tokens to scan when no --scan is given (default: {ATTACK_TOKENS})")
    attack.add_argument("--n-repeats", type=_positive(int),
                        help=f"repeats per token of that scan (default: {DEFAULT_REPEATS})")
    attack.add_argument("--clustering", choices=tuple(CLUSTERINGS), default="keys",
                        help="keys: k-means on layer-0 keys; sink_tokens: the tokens that reach the sink alone "
                             "(default: %(default)s)")
    attack.add_argument("--lengths", type=_lengths, default=(100, 300, 1000),
                        help="sequence lengths, comma-separated (default: 100,300,1000)")
    attack.add_argument("--sequences", type=_positive(int), default=40,
                        help="sequences per condition and length (default: %(default)s)")
    attack.add_argument("--patch", help="a patch file: measure the cluster sequences with it installed too")
    attack.add_argument("--seed", type=int, default=0, help="seed of the sequences and the clustering")
    circuit = sub.add_parser("circuit", parents=[common, words, neurons, as_json],
                             help="how the model marks the first token: heads, path to the sink neurons, probe, "
                                  "first-detector neurons, convergence")
    circuit.add_argument("--contexts", type=_positive(int), default=None,
                         help="corrupted runs per patching experiment (default: 8)")
    circuit.add_argument("--seed", type=int, default=0, help="seed of the probe's split and the placebos (default: 0)")
    sinks = sub.add_parser("sinks", parents=[common, neurons, as_json],
                           help="every sink in a text, not only the first: where each appears, how long it lasts, "
                                "the attention it takes and the neurons that write it")
    given = sinks.add_mutually_exclusive_group()
    given.add_argument("--text", help="a text file, read after the first token (default: the natural text, the first "
                                      "--corpus-chars characters of --corpus)")
    given.add_argument("--chat", help="a JSON list of messages ({\"role\": ..., \"content\": ...}), formatted with "
                                      "the model's own chat template")
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or a usage error already printed as one line
        return int(exit_.code or 0)
    _show_sinklens_messages()
    try:
        COMMANDS[args.command](args)
    except SinklensError as exc:
        _close_bars()
        print(f"sinklens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        _close_bars()
        print("sinklens: interrupted; what was written is kept, and the same command resumes from it", file=sys.stderr)
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


def _settings(args, model: str | None = None) -> Settings:
    """The settings of a command for ``model`` (default: its only --model, or the default model), checked."""
    models = args.model or [DEFAULT_MODEL]
    if model is None and len(models) > 1:
        raise SinklensError(f"`sinklens {args.command}` takes one --model, got {len(models)}",
                            "pass one --model (only `sinklens table` makes a row per model)")
    given = {field: getattr(args, field) for field in SETTINGS_FIELDS if getattr(args, field, None) is not None}
    settings = Settings(**{**given, "model": model or models[0]})
    settings.check()
    return settings


def _given(args) -> set[str]:
    """The options of the command line that hold other values than their defaults."""
    parser = _parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[args.command]
    return {a.dest for a in commands._actions if a.dest in vars(args) and getattr(args, a.dest) != a.default}


def _load(args, settings: Settings, *, early_layers_only: bool = True):
    """The model, once the model-free checks have passed: only the layers the analysis reads, unless it needs
    the whole model."""
    return settings.load_model(verbose=args.verbose, early_layers_only=early_layers_only)


def _print_json(data: dict) -> None:
    print(json.dumps(data))


def _report(args) -> None:
    from sinklens.present.report import run_report

    settings = _settings(args)
    out = check_output_dir(args.out)
    results = run_report(settings, out, model=_load(args, settings, early_layers_only=False), progress=True)
    for line in results["summary"]:
        print(line)
    print(f"wrote {Path(out) / 'report.html'} and {Path(out) / 'results.json'}")


def _table(args) -> None:
    from sinklens.present.sweep import PartFailed, connect_ray, table_sweep
    from sinklens.studies.table import SinkTableRow, sink_table_row

    all_settings = [_settings(args, model) for model in dict.fromkeys(args.model or [DEFAULT_MODEL])]
    if len(all_settings) == 1 and args.out is None and args.ray is None:
        settings = all_settings[0]
        row = sink_table_row(_load(args, settings), settings.corpus_text(), settings, progress=True)
        if args.json:
            _print_json(row.summary())
            return
        print(row.to_frame().to_string(index=False))
        print(f"first token: {row.choice.reason}")
        return
    out = check_output_dir(args.out or "sinklens-table")
    if args.ray is not None:
        connect_ray(args.ray)
    rows = table_sweep(all_settings, out, ray=args.ray is not None)
    done = [row for row in rows if isinstance(row, SinkTableRow)]
    failed = [row for row in rows if isinstance(row, PartFailed)]
    summaries = [row.summary() if isinstance(row, SinkTableRow) else {"model": row.name, "error": row.error}
                 for row in rows]
    write_json(out / "table.json", {"rows": summaries})
    if args.json:
        _print_json({"rows": summaries} if len(rows) > 1 else summaries[0])
    else:
        if done:
            import pandas as pd

            print(pd.concat([row.to_frame() for row in done]).to_string(index=False))
        for row in failed:
            print(f"{row.name}: {row.error}")
        print(f"wrote {out / 'table.json'}")
    if failed:
        raise SinklensError(f"{len(failed)} of {len(rows)} models have no row ({', '.join(r.name for r in failed)})",
                            "see each model's error above; the rows measured are kept, and the same command measures "
                            "only what is missing")


def _setup(args, settings: Settings, *, neurons: bool = True, early_layers_only: bool = True):
    """The model and its circuit setup on the settings' corpus."""
    from sinklens.studies.setup import circuit_setup

    model = _load(args, settings, early_layers_only=early_layers_only)
    return model, circuit_setup(model, settings.corpus_text(), settings, neurons=neurons)


def _neurons(args) -> None:
    settings = _settings(args)
    _, setup = _setup(args, settings)
    result = setup.neurons
    if args.json:
        _print_json({**setup.summary(), **result.summary()})
        return
    print(result.to_frame().head(args.top).to_string(index=False))
    print(f"first token: {setup.choice.reason}")
    print(f"sink neurons ({result.case}): {result.describe_neurons()}; the first token's norm at layer "
          f"{result.sink_layer}: {result.first_token_norm:.4g} -> {result.first_token_norm_ablated:.4g} ablated "
          f"(typical {result.typical_norm:.4g})")
    if result.notebook_neurons is not None:
        print(f"the notebook's rule (top 2 of the gate pre-activation at {result.notebook_input}): "
              f"{result.notebook_neurons}")


def _sink_layer(args) -> None:
    settings = _settings(args)
    _, setup = _setup(args, settings, neurons=False)
    result = setup.sink
    if args.json:
        _print_json({**setup.summary(), "sink_layer_detail": result.summary()})
        return
    print(result.to_frame().to_string(index=False))
    print(f"first token: {setup.choice.reason}")
    print(f"sink layer: {result.sink_layer} ({result.method})")


def _circuit(args) -> None:
    from sinklens.studies.circuit import first_layer_circuit

    settings = _settings(args)
    if args.contexts is not None and args.contexts < 2:
        raise SinklensError(f"--contexts {args.contexts} is too few", "pass at least 2 corrupted runs")
    model = _load(args, settings)
    result = first_layer_circuit(model, settings.corpus_text(), settings, n_contexts=args.contexts, seed=args.seed,
                                 progress=True)
    summary = result.summary()
    if args.json:
        _print_json({**summary, "contexts": args.contexts, "seed": args.seed})
        return
    print(f"first token: {summary['first_token']['chosen_by']}")
    print(f"sink neurons: {summary['sink_neurons']} (sink layer {summary['sink_layer']})")
    dependence = summary["first_token_dependence"]
    if not dependence["mark_traced"]:
        print(f"no first-token mark to trace: the sink neurons fire as much on the first token after text "
              f"(text removes {dependence['share_removed_by_text']:.1%} of their activation): the model makes a "
              "sink of the token wherever it stands")
    print(f"detect-others heads (layer 0 heads the sink neurons need): {summary['detect_others_heads'] or 'none'}")
    heads = result.to_frame()
    columns = [c for c in ("head", "self_attention", "uniform_self", "self_score_gap", "necessity", "necessity_placebo",
                           "in_context", "in_context_placebo", "detect_others") if c in heads]
    print(heads[columns].to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(f"path of the first-token mark to the sink neurons: {' -> '.join(summary['paths']) or 'none found'}")
    probe = ", ".join(f"{p['layer']}: {p['balanced_accuracy']:.3f} / {p['first_share_on_repeats']:.2f}"
                      for p in summary["probe"])
    print(f"probe per layer (held-out balanced accuracy / share of {summary['repeat_word']!r} repeats called "
          f"first): {probe}")
    detectors = ", ".join(f"L{n['layer']}.{n['neuron']} ({n['separation']:.3f})"
                          for n in summary["first_detector_neurons"][:5])
    print(f"first-detector neurons (separation of position 0 from 1-2): {detectors}")
    slopes = ", ".join(f"{w['word']!r} {w['slope']:.2f}" for w in summary["convergence"])
    print(f"convergence to the lone token, log-log slope (softmax leakage predicts -1): {slopes}")


def _patch(args) -> None:
    from sinklens.analyses.patch_choice import choose_patch
    from sinklens.run.tokens import check_context, default_words, words_to_tokens

    settings = _settings(args)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise SinklensError(f"{out} is a directory", "pass a file name for the patch, e.g. --out patch.json")
    check_output_dir(out.parent)
    model, setup = _setup(args, settings, early_layers_only=False)  # the patch is measured on the whole model
    words = default_words(model) if settings.words is None else words_to_tokens(model, settings.words)
    check_context(model, settings.n_repeats + 1)
    result = choose_patch(model, setup.reference, setup.sink_neurons, words, n_repeats=settings.n_repeats,
                          hooks=[args.hook] if args.hook else tuple(PATCH_HOOKS),
                          values=[args.value] if args.value else PATCH_VALUES)
    patch = result.patch
    patch.save(out)
    if args.json:
        _print_json({"patch": str(out), **patch.to_json(), "setup": setup.summary()})
        return
    print(result.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    print(f"chosen: {patch.describe()}")
    print(f"why: {result.reason}")
    print(f"wrote {out}")


def _evaluate(args) -> None:
    from sinklens.present.evaluation import EvaluationConfig, run_evaluation

    config = EvaluationConfig(model=args.model, patch=args.patch, preset=args.preset, corpus=args.corpus,
                              seed=args.seed, dtype=args.dtype, device=args.device)
    results = run_evaluation(config, args.out, progress=True, verbose=args.verbose)  # checks inputs before loading
    out = Path(args.out).expanduser()
    if args.json:
        _print_json({k: v for k, v in results.items() if k != "summary"})
        return
    for line in results["summary"]:
        print(line)
    print(f"wrote {out / 'evaluation.html'} and {out / 'evaluation.json'}")


def _scan(args) -> None:
    import html

    import pandas as pd

    from sinklens.load.models import placement
    from sinklens.present._page import page, section
    from sinklens.present.sweep import (
        PartFailed,
        connect_ray,
        default_shards,
        scan_shards,
    )
    from sinklens.run.tokens import check_context, encode
    from sinklens.studies.scan import (
        Screen,
        check_token_ids,
        merge_scan,
        prepare_scan_dir,
        run_scan,
        scan_setup,
        select_tokens,
    )
    from sinklens.studies.scan_store import stored_setup

    settings = _settings(args)
    if args.shards is not None and args.ray is None:
        raise SinklensError("--shards splits a scan into Ray tasks and needs --ray",
                            "add --ray, or run the shards as your own jobs with --shard i/n")
    if args.ray is not None and args.shard != (1, 1):
        raise SinklensError("--ray splits the scan into shards itself", "drop --shard, or drop --ray")
    out = check_output_dir(args.out)
    text = settings.corpus_text()
    if args.ray is not None:
        connect_ray(args.ray)
    model = _load(args, settings)
    where = placement(model)
    tokens = check_token_ids(model, args.token_ids) if args.token_ids is not None else \
        select_tokens(model, args.tokens, seed=args.seed)
    prefix = tuple(encode(model, args.prefix)) if args.prefix else ()
    check_context(model, 1 + len(prefix) + settings.n_repeats)
    setup = stored_setup(out, model.cfg.model_name, dataclasses.asdict(settings), prefix) or scan_setup(
        model, text, settings, prefix=args.prefix)
    screen = None if args.exhaustive else Screen(args.screen_repeats, args.screen_threshold, args.calibration,
                                                    args.positives, args.seed)
    if args.ray is not None:
        prepare_scan_dir(out, setup, screen, tokens)
        del model  # each Ray task loads its own
        parts = scan_shards(settings, setup, tokens, out, args.shards or default_shards(), batch_size=args.batch_size,
                            screen=screen)
        lost = [part for part in parts if isinstance(part, PartFailed)]
        if lost:
            raise SinklensError(f"{len(lost)} of {len(parts)} shards did not finish ({lost[0].name}: {lost[0].error})",
                                "run the same command again: the rows written are kept and only the rest is scanned")
        written = None
    else:
        written = run_scan(model, setup, tokens, out, shard=args.shard, batch_size=args.batch_size, screen=screen,
                           progress=True)
    if args.shard[1] > 1:
        line = {"shard": list(args.shard), "screened": written.screened, "rows_written": written.full}
        print(json.dumps(line) if args.json else f"shard {args.shard[0]}/{args.shard[1]}: {written.screened} tokens "
                                                 f"screened, {written.full} run in full into {out}; run without "
                                                 "--shard to scan what is missing and merge")
        return
    scan = merge_scan(out, tokens)
    summary = {**scan.summary(), **where, "batch_size": args.batch_size, "seed": args.seed}
    write_json(out / "summary.json", summary)
    frame = scan.to_frame()
    sections = [
        section("Distribution", f"{summary['n_verified']} of {summary['n_tokens']} tokens run in full, each repeated "
                f"{summary['n_repeats']} times after the first token; sink regime: "
                f"{html.escape(summary['definition'])}.", scan.plot()),
        section("The tokens with the largest peak norm", "", frame=frame.nlargest(30, "peak_ratio")),
        section("What the data says about why", "Spearman correlation with the peak norm over typical, 95% interval "
                "(Fisher z), sample size.", frame=pd.DataFrame(summary["correlations"])),
    ]
    write_text(out / "scan.html", page(f"sinklens scan: {settings.model}", f"Rows: <code>{out / 'scan.parquet'}</code>.",
                                       _scan_lines(summary), sections))
    if args.json:
        _print_json(summary)
        return
    for line in _scan_lines(summary):
        print(line)
    print(f"wrote {out / 'scan.parquet'}, {out / 'summary.json'} and {out / 'scan.html'}")


def _scan_lines(summary: dict) -> list[str]:
    top = ", ".join(f"{t['text']!r} {t['peak_ratio']:.0f}x" for t in summary["top_tokens"][:10])
    point = "?" if summary["share_reached_sink"] is None else f"{summary['share_reached_sink']:.2%}"
    share = (f"{point} (95% CI {summary['ci_low']:.2%}-{summary['ci_high']:.2%}) of {summary['n_tokens']} tokens reach "
             f"the sink regime at {summary['n_repeats']} repeats")
    screen = summary["screen"]
    if screen is None:
        lines = [f"{share}: {summary['n_reached_sink']} run in full; {summary['n_first_crossing']} cross it at least "
                 "once"]
    else:
        recall = ("not measured (no calibration negative run)" if summary["screen_recall"] is None else
                  f"{summary['screen_recall']:.1%} (95% CI {summary['screen_recall_ci_low']:.1%}-"
                  f"{summary['screen_recall_ci_high']:.1%})")
        lines = [f"{share} (estimated): {summary['n_reached_sink']} found by {summary['n_verified']} full runs",
                 f"screen ({screen['n_repeats']} repeats, score >= {screen['threshold']}): {screen['n_screen_positive']} "
                 f"positives; recall {recall}, from {screen['n_missed_in_calibration']} missed among "
                 f"{screen['n_calibration_negatives_run']} calibration negatives run in full"]
    if summary["missing"]:
        lines.append(f"{summary['missing']} tokens asked for are not measured yet: run the same command to finish")
    lines.append(f"top tokens by peak norm over typical: {top}")
    lines += [f"Spearman({c['feature']}, peak ratio) = {c['spearman_with_peak_ratio']:+.3f} "
              f"(95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, n={c['n']})" for c in summary["correlations"]]
    return lines


def _attack(args) -> None:
    from sinklens.load.models import placement
    from sinklens.run.patch import SinkPatch
    from sinklens.run.tokens import check_context
    from sinklens.studies.attack import cluster_attack
    from sinklens.studies.scan import merge_scan, scan_setup, scan_tokens, select_tokens
    from sinklens.studies.scan_store import stored_setup

    settings = _settings(args)
    patch = SinkPatch.load(args.patch) if args.patch else None
    if args.scan:
        if not (Path(args.scan) / "scan.json").is_file():
            raise SinklensError(f"{args.scan} holds no scan", "run: sinklens scan --out DIR, then pass --scan DIR")
        if args.tokens is not None:
            raise SinklensError("--tokens sets the scan made when no --scan is given",
                                "drop it: the tokens of the scan in --scan DIR are used")
    model = _load(args, settings, early_layers_only=False)
    if patch is not None:
        patch.check(model.cfg.n_layers, model.cfg.d_mlp, model.cfg.model_name)
    check_context(model, 1 + max(args.lengths))
    if args.scan:
        given = {k: v for k, v in dataclasses.asdict(settings).items() if k in _given(args)}
        setup = stored_setup(args.scan, model.cfg.model_name, given)  # the scan's own settings, unless overridden
        scan = merge_scan(args.scan)
    else:
        setup = scan_setup(model, settings.corpus_text(), settings)
        scan = scan_tokens(model, setup, select_tokens(model, args.tokens or ATTACK_TOKENS, seed=args.seed),
                           progress=True)
    result = cluster_attack(model, setup, scan, clustering=args.clustering, lengths=args.lengths,
                            n_sequences=args.sequences, patch=patch, seed=args.seed, progress=True)
    summary = result.summary()
    if args.json:
        _print_json({**summary, **placement(model), "setup": setup.to_json(), "seed": args.seed})
        return
    print(f"cluster ({args.clustering}): {summary['cluster_size']} tokens, {summary['cluster_sink_share']:.0%} of them "
          f"reach the sink when repeated alone: {', '.join(repr(t) for t in summary['cluster_tokens'][:15])}")
    print(summary["definition"])
    print(result.rates().to_string(index=False, float_format=lambda x: f"{x:.3g}"))


def _sinks(args) -> None:
    from sinklens.load.corpus import read_messages, read_text
    from sinklens.run.tokens import chat_tokens, text_tokens
    from sinklens.studies.census import find_sinks

    settings = _settings(args)
    messages = read_messages(args.chat) if args.chat else None  # bad input fails before the model loads
    text = read_text(args.text) if args.text else None
    model, setup = _setup(args, settings, early_layers_only=False)  # a sink may appear in any layer
    if messages is not None:
        tokens, label = chat_tokens(model, messages), f"the chat {Path(args.chat).name}"
    else:
        tokens = text_tokens(model, settings.natural_text() if text is None else text, first=setup.first.id)
        label = "the natural text" if text is None else Path(args.text).name
    census = find_sinks(model, tokens, settings, setup=setup, label=label, progress=True)
    if args.json:
        _print_json(census.summary())
        return
    print(f"{len(census.sinks)} sinks in {label} ({census.tokens.shape[1]} tokens); first token: {setup.choice.reason}")
    if census.sinks:
        print(census.to_frame().to_string(index=False, float_format=lambda x: f"{x:.4g}"))


COMMANDS = {"report": _report, "table": _table, "neurons": _neurons, "sink-layer": _sink_layer, "circuit": _circuit,
            "patch": _patch, "evaluate": _evaluate, "scan": _scan, "attack": _attack, "sinks": _sinks}

if __name__ == "__main__":
    sys.exit(main())
