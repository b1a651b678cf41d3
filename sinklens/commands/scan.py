"""``sinklens scan``: which tokens of the vocabulary open the sink when repeated.

Every token asked for is first screened by a short run; the screen positives and a calibration sample (which
measures the screen's recall) are run in full. Rows land in ``--out`` as they are measured, so the same
command resumes, and ``--shard i/n`` splits the work over independent jobs (a Slurm array) that fill one
directory.

Example: sinklens scan --tokens 2000 --out sinklens-scan
"""

from __future__ import annotations

import argparse
import json

from sinklens.commands import _options as options
from sinklens.defaults import (
    RAY_LOCAL,
    SCAN_TOKENS,
    SCREEN_CALIBRATION,
    SCREEN_POSITIVES,
    SCREEN_REPEATS,
    SCREEN_THRESHOLD,
)
from sinklens.load.sources import SCAN_BATCH_CPU, SCAN_BATCH_CUDA

HELP = "repeat every token (or a stratified sample) and measure which reach the sink"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    options.study(parser)
    options.neurons(parser)
    options.as_json(parser)
    options.on_ray(parser, RAY_LOCAL)
    parser.add_argument(
        "--out",
        default="sinklens-scan",
        help="output directory, shared by shards (default: %(default)s)",
    )
    parser.add_argument(
        "--tokens",
        type=options.token_count,
        default=SCAN_TOKENS,
        help="N tokens in a seeded sample stratified by token id, or all (default: %(default)s)",
    )
    parser.add_argument(
        "--token-ids",
        type=options.token_ids,
        help="scan this subset instead: comma-separated token ids, or @FILE with one id per line",
    )
    options.repeats(parser, "repeats per token")
    parser.add_argument(
        "--shard",
        type=options.shard,
        default=(1, 1),
        help="i/n (1-based): scan every n-th token from the i-th, as one of n independent jobs "
        "(a Slurm array --array=1-N runs --shard $SLURM_ARRAY_TASK_ID/N); a run without "
        "--shard scans what is missing and merges (default: 1/1)",
    )
    parser.add_argument(
        "--shards",
        type=options.positive(int),
        help="with --ray: the number of shard tasks (default: one per GPU of the cluster, else "
        "one per two CPUs)",
    )
    parser.add_argument(
        "--exhaustive",
        action="store_true",
        help="run every token in full, with no screen (default: screen every token with a short "
        "run, then run the screen positives and a calibration sample in full)",
    )
    parser.add_argument(
        "--screen-repeats",
        type=options.positive(int),
        default=SCREEN_REPEATS,
        help="repeats of the screen's short run (default: %(default)s)",
    )
    parser.add_argument(
        "--screen-threshold",
        type=options.share,
        default=SCREEN_THRESHOLD,
        help="a token is a screen positive when its short run's peak norm goes this far from "
        "typical toward the first token's norm, in log space (0..1; the sink regime is "
        "0.9) (default: %(default)s)",
    )
    parser.add_argument(
        "--calibration",
        type=options.count,
        default=SCREEN_CALIBRATION,
        help="tokens of the request, drawn at random, run in full whatever the screen says: "
        "they measure the screen's recall (default: %(default)s)",
    )
    parser.add_argument(
        "--positives",
        type=options.share,
        default=SCREEN_POSITIVES,
        help="share of the screen positives run in full, drawn at random: below 1 trades a "
        "wider interval for time (default: %(default)s, all)",
    )
    parser.add_argument(
        "--batch-size",
        type=options.positive(int),
        help=f"tokens per forward pass (default: {SCAN_BATCH_CPU} on the CPU, {SCAN_BATCH_CUDA} on a GPU)",
    )
    parser.add_argument(
        "--prefix", default="", help="text between the first token and the repeats (default: none)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the token sample (default: %(default)s)"
    )


def run(args: argparse.Namespace) -> None:
    from sinklens.present.scan_page import PAGE_FILE, scan_lines, write_scan
    from sinklens.studies.scan_directory import SUMMARY_FILE
    from sinklens.studies.scan_store import TABLE_FILE, Screen

    settings = options.settings_of(args)
    screen = (
        None
        if args.exhaustive
        else Screen(
            args.screen_repeats, args.screen_threshold, args.calibration, args.positives, args.seed
        )
    )
    done = write_scan(
        args.out,
        settings,
        tokens=args.tokens,
        token_ids=args.token_ids,
        prefix=args.prefix,
        screen=screen,
        shard=args.shard,
        ray=args.ray,
        shards=args.shards,
        batch_size=args.batch_size,
        seed=args.seed,
        verbose=args.verbose,
        progress=True,
    )
    if done.written is not None:
        index, total = args.shard
        written = {
            "shard": [index, total],
            "screened": done.written.screened,
            "rows_written": done.written.full,
        }
        print(
            json.dumps(written)
            if args.json
            else f"shard {index}/{total}: {done.written.screened} tokens screened, {done.written.full} run in full "
            f"into {done.out}; run without --shard to scan what is missing and merge"
        )
        return
    assert done.summary is not None
    if args.json:
        options.print_json(done.summary)
        return
    for line in scan_lines(done.summary):
        print(line)
    print(f"wrote {done.out / TABLE_FILE}, {done.out / SUMMARY_FILE} and {done.out / PAGE_FILE}")
