"""The one HTML page builder: the report, the evaluation and the scan each write one self-contained
page of sections (a heading, a paragraph, plotly figures and a table), which opens offline.

Every page fits a laptop's window (1,280 px): the body is at most :data:`MAX_WIDTH` px wide, each
table sits in a box of its own that scrolls sideways (``overflow-x:auto``) rather than widening the
page, and the figures take the width of the page (responsive plotly, no fixed width).
"""

from __future__ import annotations

import html
from collections.abc import Sequence

from plotly.offline import get_plotlyjs

MAX_WIDTH = 1200  # px, the body's content: a 1,280 px window less its scrollbar and margins
TABLE_BOX = "table-box"  # the class of the box each table scrolls in
STYLE = f"""
*,*::before,*::after{{box-sizing:border-box}}
body{{font-family:sans-serif;line-height:1.4;max-width:{MAX_WIDTH}px;margin:2em auto;padding:0 1em}}
p,li,summary{{overflow-wrap:anywhere}}
.{TABLE_BOX}{{max-width:100%;overflow-x:auto;margin:0.5em 0 1em}}
.table{{border-collapse:collapse;font-size:0.85em}}
.table td,.table th{{border:1px solid #ccc;padding:2px 6px}}
.figure{{width:100%;max-width:100%;overflow:hidden}}
.findings{{font-size:1.08em}}
.findings li{{margin:0.3em 0}}
details.details{{margin:0.5em 0 1em}}
details.details>summary{{cursor:pointer;color:#1a5fb4}}
"""


def versions_text(versions: dict[str, str]) -> str:
    """``sinklens 0.1.0, torch 2.13.0, ...``: the versions line of a page."""
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def section(title: str, text: str, *figures, frame=None) -> str:
    """One section: ``title``, a paragraph of HTML ``text``, the plotly ``figures`` (as wide as the
    page) and an optional DataFrame (in a box that scrolls sideways when the table is wider than the
    page)."""
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p>{text}</p>"]
    parts += [
        '<div class="figure">'
        + figure.to_html(
            full_html=False,
            include_plotlyjs=False,
            config={"responsive": True},
            default_width="100%",
        )
        + "</div>"
        for figure in figures
    ]
    if frame is not None:
        table = frame.to_html(
            index=False, float_format=lambda x: f"{x:.4g}", classes="table", na_rep=""
        )
        parts.append(f'<div class="{TABLE_BOX}">{table}</div>')
    return "\n".join(parts)


def page(
    title: str,
    intro: str,
    summary: Sequence[str],
    sections: Sequence[str],
    *,
    findings: Sequence[str] | None = None,
) -> str:
    """A self-contained HTML page: plotly.js inlined, so it opens offline.

    The summary is the ``summary`` sentences as a list; with ``findings`` (plain text), those few
    sentences open the page and ``summary`` waits one click away, in a ``<details>`` element."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary)
    if findings is None:
        head = f"<ul>{items}</ul>"
    else:
        found = "".join(f"<li>{html.escape(line)}</li>" for line in findings)
        head = (
            f'<ul class="findings">{found}</ul>\n<details class="details"><summary>The details: '
            f"every measurement in a sentence</summary><ul>{items}</ul></details>"
        )
    return f"""<!doctype html>
<html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>{STYLE}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{intro}</p>
<h2>Summary</h2>
{head}
{"".join(sections)}
</body></html>
"""
