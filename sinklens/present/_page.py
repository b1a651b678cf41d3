"""What the report and the evaluation share: checked output folders, resumable steps, the HTML page."""

from __future__ import annotations

import html
import shutil
from collections.abc import Callable, Sequence
from importlib.metadata import version
from pathlib import Path

from plotly.offline import get_plotlyjs

from sinklens._io import write_text
from sinklens.results import Result, load_or_compute


class Checkpoints:
    """Step results saved under ``OUT/.steps``, valid for one config fingerprint."""

    def __init__(self, out: Path, fingerprint: str):
        self.dir = out / ".steps"
        stamp = self.dir / "fingerprint"
        if not stamp.is_file() or stamp.read_text() != fingerprint:
            shutil.rmtree(self.dir, ignore_errors=True)
            write_text(stamp, fingerprint)

    def get(self, name: str, compute: Callable[[], Result]) -> Result:
        return load_or_compute(self.dir / f"{name}.pt", compute)


def versions() -> dict[str, str]:
    """The versions of sinklens and of the libraries its numbers depend on."""
    return {name: version(name) for name in ("sinklens", "transformer-lens", "transformers", "torch")}


def versions_text(versions: dict[str, str]) -> str:
    return ", ".join(f"{k} {v}" for k, v in versions.items())


def section(title: str, text: str, *figures, frame=None) -> str:
    parts = [f"<h2>{html.escape(title)}</h2>", f"<p>{text}</p>"]
    parts += [figure.to_html(full_html=False, include_plotlyjs=False) for figure in figures]
    if frame is not None:
        parts.append(frame.to_html(index=False, float_format=lambda x: f"{x:.4g}", classes="table", na_rep=""))
    return "\n".join(parts)


def page(title: str, intro: str, summary: Sequence[str], sections: Sequence[str]) -> str:
    """A self-contained HTML page: plotly.js inlined, so it opens offline."""
    items = "".join(f"<li>{html.escape(line)}</li>" for line in summary)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<script type="text/javascript">{get_plotlyjs()}</script>
<style>body{{font-family:sans-serif;max-width:1200px;margin:2em auto;}} .table{{border-collapse:collapse;font-size:0.85em}}
.table td,.table th{{border:1px solid #ccc;padding:2px 6px}}</style></head><body>
<h1>{html.escape(title)}</h1>
<p>{intro}</p>
<h2>Summary</h2><ul>{items}</ul>
{''.join(sections)}
</body></html>
"""
