"""The ``sinklens`` command: ``report`` for the whole study, one command per analysis otherwise."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sinklens.analyses.sink_layer import PAPER_MAX_LAYER, PAPER_N_SIGMA
from sinklens.errors import SinklensError
from sinklens.load.registry import DEFAULT_MODEL, MODEL_ALIASES
from sinklens.present.report import PAPER_CORPUS_CHARS, ReportConfig, run_report


def _first_token(value: str) -> str | int:
    return int(value) if value.lstrip("-").isdigit() else value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sinklens", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"alias ({', '.join(MODEL_ALIASES)}), .gguf file, HF directory or hub name "
                             f"(default: {DEFAULT_MODEL})")
    common.add_argument("--first-token", type=_first_token, default="bos",
                        help="token at position 0: bos (default), eos, a token id, or a word")
    common.add_argument("--max-layer", type=int, default=PAPER_MAX_LAYER,
                        help="search layers 0..max-layer-1 for the sink layer (default: %(default)s)")
    common.add_argument("--n-sigma", type=float, default=PAPER_N_SIGMA,
                        help="sink layer threshold: mean + n-sigma * std (default: %(default)s)")

    report = sub.add_parser("report", parents=[common], help="write report.html and results.json")
    report.add_argument("--out", default="sinklens-report", help="output directory (default: %(default)s)")
    report.add_argument("--words", nargs="+", help="single-token words to repeat (default: the tokens of "
                                                   "'Another one bites the dust')")
    report.add_argument("--n-repeats", type=int, default=1000, help="repeats per word (default: %(default)s)")
    report.add_argument("--corpus", help="natural-text file for the typical norm (default: Tiny Shakespeare's opening)")
    report.add_argument("--sink-layer", type=int,
                        help="use this layer for the norm curves instead of the detected one")
    report.add_argument("--corpus-chars", type=int, default=PAPER_CORPUS_CHARS,
                        help="characters of the corpus to use (default: %(default)s)")

    sub.add_parser("sink-layer", parents=[common], help="print the first-token MLP norms and the sink layer")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "report":
            config = ReportConfig(
                model=args.model, words=args.words, n_repeats=args.n_repeats, first_token=args.first_token,
                corpus=args.corpus, corpus_chars=args.corpus_chars, max_layer=args.max_layer, n_sigma=args.n_sigma,
                sink_layer=args.sink_layer,
            )
            results = run_report(config, args.out, progress=True)
            out = Path(args.out)
            print(f"sink layer {results['sink_layer']}; typical norm {results['typical_norm']:.4g}; "
                  f"first-token norm {results['first_token_norm']:.4g}")
            for word in results["words"]:
                print(f"  {word['word']!r:>12} max norm {word['max_norm']:10.4g}  repeats to sink "
                      f"{word['repeats_to_sink']}")
            print(f"wrote {out / 'report.html'} and {out / 'results.json'}")
        elif args.command == "sink-layer":
            from sinklens.analyses.sink_layer import find_sink_layer
            from sinklens.load.models import load_model

            model = load_model(args.model)
            result = find_sink_layer(model, first=args.first_token, max_layer=args.max_layer, n_sigma=args.n_sigma)
            print(result.to_frame().to_string(index=False))
            print(f"sink layer: {result.sink_layer}")
    except SinklensError as exc:
        print(f"sinklens: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
