"""How fast the command line answers and ``import sinklens`` returns, beside a plain ``python -c pass``.

    python bench/bench_startup.py [--rounds 3]

Each command runs ``--rounds`` times in a fresh process, one after the other; the median wall time is printed
(target: ``sinklens --help`` and an argument error under 1 second). ``sl.load_model`` is the first use of a
name that needs torch and TransformerLens: what every command that loads a model pays once.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time

from _harness import print_summary

TARGET_SECONDS = 1.0


def commands() -> dict[str, list[str]]:
    sinklens = shutil.which("sinklens") or sys.exit(
        "the sinklens command is not installed (pip install -e .)"
    )
    python = sys.executable
    return {
        "python -c pass": [python, "-c", "pass"],
        "import sinklens": [python, "-c", "import sinklens"],
        "sinklens --help": [sinklens, "--help"],
        "sinklens table --help": [sinklens, "table", "--help"],
        "sinklens table --dtype float8 (refused)": [sinklens, "table", "--dtype", "float8"],
        "import sinklens; sl.load_model (torch, TransformerLens)": [
            python,
            "-c",
            "import sinklens as sl; sl.load_model",
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    medians = {}
    for name, command in commands().items():
        times = []
        for _ in range(args.rounds):
            start = time.perf_counter()
            subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times.append(time.perf_counter() - start)
        medians[name] = statistics.median(times)
        print(f"{name}: median {medians[name]:.2f} s (range {min(times):.2f}-{max(times):.2f})")
    answering = [n for n in medians if n.startswith("sinklens ")]
    print_summary(
        "startup",
        seconds={n: round(t, 3) for n, t in medians.items()},
        over_python={n: round(t / medians["python -c pass"], 1) for n, t in medians.items()},
        met={n: medians[n] < TARGET_SECONDS for n in answering},
        targets={"seconds": f"< {TARGET_SECONDS}"},
    )


if __name__ == "__main__":
    main()
