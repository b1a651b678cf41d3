"""mkdocs hook: tables generated from the measurement records they report.

A page may hold a table between ``<!-- record-table:NAME:begin -->`` and ``<!-- record-table:NAME:end -->``;
the table is the rendering of ``docs/records/NAME.json`` by the function of the same name below. The build
writes the table from the record, and when the page's own copy (the one GitHub shows) differs, it warns with
the table to paste, so ``mkdocs build --strict`` fails until the page and the record agree: a number lives in
its record, and the page only shows it. ``python docs/hooks/records.py NAME`` prints the table.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path

RECORDS = Path(__file__).resolve().parents[1] / "records"
BLOCK = re.compile(r"(<!-- record-table:([\w-]+):begin[^>]*-->\n)(.*?)(<!-- record-table:\2:end -->)", re.S)
log = logging.getLogger("mkdocs.plugins.sinklens.records")


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def _time(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"


def memory_7b_cpu(record: dict) -> str:
    """Each command's peak resident memory against the weights it read."""
    lines = [
        "| command | dtype | layers built | weights read | peak resident | peak / weights read | wall time |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in record["runs"]:
        lines.append(
            f"| `{run['command']}` | {run['dtype']} | {run['layers_built']} | {_gb(run['weights_bytes'])} | "
            f"{_gb(run['peak_resident_bytes'])} | {run['peak_resident_bytes'] / run['weights_bytes']:.2f}x | "
            f"{_time(run['seconds'])} |"
        )
    return "\n".join(lines) + "\n"


def table(name: str) -> str:
    record = json.loads((RECORDS / f"{name}.json").read_text(encoding="utf-8"))
    return globals()[name.replace("-", "_")](record)


def on_page_markdown(markdown: str, page, **kwargs) -> str:
    """Replace each record table of the page by the record's rendering; warn where the page's copy differs."""

    def render(match: re.Match) -> str:
        name, shown = match.group(2), match.group(3)
        wanted = table(name)
        if shown.strip() != wanted.strip():
            log.warning(
                f"{page.file.src_uri}: the {name} table differs from docs/records/{name}.json; "
                f"paste this between its markers:\n{wanted}"
            )
        return f"{match.group(1)}{wanted}{match.group(4)}"

    return BLOCK.sub(render, markdown)


if __name__ == "__main__":
    print(table(sys.argv[1]), end="")
