"""A vocabulary scan as a page and as lines of text: ``scan.html`` beside the rows that
:func:`sinklens.studies.scan_directory.scan_into` wrote, and the lines ``sinklens scan`` prints.
:func:`write_scan` is what ``sinklens scan`` runs: the scan, then its page."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from sinklens._io import write_text
from sinklens.present.page import page, section
from sinklens.studies.scan_directory import ScanDirectory, scan_into
from sinklens.studies.scan_store import TABLE_FILE
from sinklens.studies.vocab_scan import VocabScan

PAGE_FILE = "scan.html"
TOP_TOKENS_SHOWN = 30


def write_scan(out: str | Path, *args: Any, **kwargs: Any) -> ScanDirectory:
    """:func:`~sinklens.studies.scan_directory.scan_into` (same arguments), then, once the shards are merged,
    ``scan.html`` beside the rows."""
    done = scan_into(out, *args, **kwargs)
    if done.scan is not None and done.summary is not None:
        write_text(done.out / PAGE_FILE, render_scan(done.scan, done.summary, done.out))
    return done


def render_scan(scan: VocabScan, summary: dict[str, Any], out: Path) -> str:
    """The scan's self-contained HTML page: the distribution, the tokens with the largest peak norm, and the
    correlations with the candidate explanations."""
    frame = scan.to_frame()
    sections = [
        section(
            "Distribution",
            f"{summary['n_verified']} of {summary['n_tokens']} tokens run in full, each "
            f"repeated {summary['n_repeats']} times after the first token; sink regime: "
            f"{html.escape(summary['definition'])}.",
            scan.plot(),
        ),
        section(
            "The tokens with the largest peak norm",
            "",
            frame=frame.nlargest(TOP_TOKENS_SHOWN, "peak_ratio"),
        ),
        section(
            "What the data says about why",
            "Spearman correlation with the peak norm over typical, 95% "
            "interval (Fisher z), sample size.",
            frame=pd.DataFrame(summary["correlations"]),
        ),
    ]
    return page(
        f"sinklens scan: {scan.setup['model']}",
        f"Rows: <code>{out / TABLE_FILE}</code>.",
        scan_lines(summary),
        sections,
    )


def scan_lines(summary: dict[str, Any]) -> list[str]:
    """The scan's findings in a few sentences: the share that reaches the sink, the screen's recall, what is
    missing, the top tokens and the correlations."""
    top = ", ".join(f"{t['text']!r} {t['peak_ratio']:.0f}x" for t in summary["top_tokens"][:10])
    point = "?" if summary["share_reached_sink"] is None else f"{summary['share_reached_sink']:.2%}"
    share = (
        f"{point} (95% CI {summary['ci_low']:.2%}-{summary['ci_high']:.2%}) of {summary['n_tokens']} tokens "
        f"reach the sink regime at {summary['n_repeats']} repeats"
    )
    screen = summary["screen"]
    if screen is None:
        lines = [
            f"{share}: {summary['n_reached_sink']} run in full; {summary['n_first_crossing']} cross it at "
            "least once"
        ]
    else:
        recall = (
            "not measured (no calibration negative run)"
            if summary["screen_recall"] is None
            else f"{summary['screen_recall']:.1%} (95% CI {summary['screen_recall_ci_low']:.1%}-"
            f"{summary['screen_recall_ci_high']:.1%})"
        )
        lines = [
            f"{share} (estimated): {summary['n_reached_sink']} found by {summary['n_verified']} full runs",
            f"screen ({screen['n_repeats']} repeats, score >= {screen['threshold']}): "
            f"{screen['n_screen_positive']} positives; recall {recall}, from "
            f"{screen['n_missed_in_calibration']} missed among {screen['n_calibration_negatives_run']} "
            "calibration negatives run in full",
        ]
    if summary["missing"]:
        lines.append(
            f"{summary['missing']} tokens asked for are not measured yet: run the same command to finish"
        )
    lines.append(f"top tokens by peak norm over typical: {top}")
    lines += [
        f"Spearman({c['feature']}, peak ratio) = {c['spearman_with_peak_ratio']:+.3f} "
        f"(95% CI {c['ci_low']:+.3f} to {c['ci_high']:+.3f}, n={c['n']})"
        for c in summary["correlations"]
    ]
    return lines
