"""Compare two ``results.json`` files key by key: the check that a change to sinklens changed no number.

    python bench/compare_results.py BEFORE/results.json AFTER/results.json [--rtol 1e-3] [--ignore versions]

Numbers must agree within ``--rtol`` (relative), everything else exactly; keys present on one side only are
listed. Prints one line per difference and, last, a JSON object with the counts; exits 1 if anything differs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any


def differences(before: Any, after: Any, rtol: float, path: str = "") -> list[str]:
    """Every place where ``after`` differs from ``before`` (numbers within ``rtol`` relative agree)."""
    if isinstance(before, dict) and isinstance(after, dict):
        found = [f"{path}.{k}: only before" for k in before.keys() - after.keys()]
        found += [f"{path}.{k}: only after" for k in after.keys() - before.keys()]
        for key in before.keys() & after.keys():
            found += differences(before[key], after[key], rtol, f"{path}.{key}")
        return found
    if isinstance(before, list) and isinstance(after, list):
        if len(before) != len(after):
            return [f"{path}: {len(before)} items before, {len(after)} after"]
        return [
            d
            for i, (b, a) in enumerate(zip(before, after))
            for d in differences(b, a, rtol, f"{path}[{i}]")
        ]
    numbers = (int, float)
    if isinstance(before, numbers) and isinstance(after, numbers) and not isinstance(before, bool):
        if math.isclose(before, after, rel_tol=rtol, abs_tol=1e-12) or (
            math.isnan(before) and math.isnan(after)
        ):
            return []
        return [f"{path}: {before!r} -> {after!r}"]
    return [] if before == after else [f"{path}: {before!r} -> {after!r}"]


def count_leaves(value: Any) -> int:
    if isinstance(value, dict):
        return sum(count_leaves(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_leaves(v) for v in value)
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before", type=Path)
    parser.add_argument("after", type=Path)
    parser.add_argument(
        "--rtol", type=float, default=1e-3, help="relative tolerance of numbers (default: 1e-3)"
    )
    parser.add_argument("--ignore", nargs="*", default=["versions"], help="top-level keys to skip")
    args = parser.parse_args()
    before, after = (json.loads(p.read_text(encoding="utf-8")) for p in (args.before, args.after))
    for key in args.ignore:
        before.pop(key, None), after.pop(key, None)
    found = differences(before, after, args.rtol)
    for line in found:
        print(line)
    print(
        json.dumps(
            {
                "values_compared": count_leaves(before),
                "differences": len(found),
                "rtol": args.rtol,
                "ignored": args.ignore,
            }
        )
    )
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
