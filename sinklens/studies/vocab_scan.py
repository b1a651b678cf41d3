"""A vocabulary scan's table: :class:`VocabScan` (rows, distribution, share that reaches the sink with its
interval, the screen's recall, correlations with the candidate explanations) and :func:`merge_scan`, which reads
every shard's rows of a scan directory into it. :mod:`sinklens.studies.scan` measures the rows.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from scipy import stats

from sinklens._io import atomic_path
from sinklens.analyses._stats import proportion_interval
from sinklens.analyses.norms import sink_threshold
from sinklens.errors import SinklensError
from sinklens.results import Result
from sinklens.studies.scan_store import (
    SETUP_FILE,
    TABLE_FILE,
    ScanSetup,
    all_rows,
    runs_in_full,
    screen_draws,
    screen_score,
    stored_request,
    stored_screen,
)

# the candidate explanations each row records, correlated with the peak norm in the summary
FEATURES = ("token_id", "embedding_norm", "first_detector_score", "layer0_lone_cosine")


@dataclass
class VocabScan(Result):
    """The scan's table, one row per token, with the setup (and the screen, for a screened scan) that produced it.

    Every row has ``token_id``, ``verified`` (a full run measured it) and ``reached_sink`` (the full run's
    verdict where there is one, else the screen's); a screened scan's rows add ``screen_score``,
    ``screen_positive``, ``calibration`` (drawn for a full run whatever the screen said) and ``due`` (the
    scan runs it in full: a calibration token, or a screen positive drawn for a full run).
    """

    setup: dict
    rows: list[dict]
    requested: int  # tokens asked for (the table may still miss some: see summary()["missing"])
    screen: dict | None = None

    def to_frame(self) -> pd.DataFrame:
        frame = pd.DataFrame(self.rows).sort_values("token_id").reset_index(drop=True)
        for column in ("repeats_to_sink", "first_crossing"):
            frame[column] = pd.array(frame[column], dtype="Int64")
        return frame

    def unbiased(self) -> pd.DataFrame:
        """Full-run rows that are a uniform sample of the request: all of them, or a screened scan's calibration."""
        frame = self.to_frame()
        return frame[frame["verified"] & (frame["calibration"] if self.screen else True)]

    def correlations(self) -> list[dict]:
        """Spearman correlation of each feature with the peak norm ratio, with a 95% interval (Fisher z), over
        :meth:`unbiased` rows (none below 4 rows)."""
        frame = self.unbiased()
        result: list[dict] = []
        if len(frame) < 4:
            return result
        for feature in FEATURES:
            rho, p = stats.spearmanr(frame[feature], frame["peak_ratio"])
            n = len(frame)
            half = 1.96 / math.sqrt(n - 3)
            low, high = (
                math.tanh(math.atanh(max(min(rho, 0.999999), -0.999999)) + s * half)
                for s in (-1, 1)
            )
            result.append(
                {
                    "feature": "frequency rank (token id)" if feature == "token_id" else feature,
                    "spearman_with_peak_ratio": float(rho),
                    "ci_low": low,
                    "ci_high": high,
                    "n": n,
                    "p_value": float(p),
                }
            )
        return result

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        frame = frame[frame["verified"]]
        fig = make_subplots(
            rows=1,
            cols=2,
            subplot_titles=[
                "Peak norm over typical (log10)",
                "Peak norm vs token id (frequency-rank proxy)",
            ],
        )
        fig.add_histogram(x=np.log10(frame["peak_ratio"]), nbinsx=80, name="tokens", row=1, col=1)
        for reached, colour in ((False, "steelblue"), (True, "firebrick")):
            part = frame[frame["reached_sink"] == reached]
            fig.add_scatter(
                x=part["token_id"],
                y=part["peak_ratio"],
                mode="markers",
                marker={"size": 3, "color": colour},
                text=part["text"],
                name="reached the sink" if reached else "did not",
                row=1,
                col=2,
            )
        fig.update_yaxes(type="log", row=1, col=2)
        fig.update_layout(
            title=f"Vocabulary scan: {len(frame)} tokens run in full, {self.setup['n_repeats']} repeats",
            height=450,
        )
        return fig

    def summary(self) -> dict:
        frame = self.to_frame()
        verified = frame[frame["verified"]]
        top = verified.sort_values("peak_ratio", ascending=False).head(20)
        summary = {
            "n_tokens": len(frame),
            "n_repeats": self.setup["n_repeats"],
            "n_reached_sink": int(verified["reached_sink"].sum()),
            "n_verified": len(verified),
            **(self._screened_estimate(frame) if self.screen else self._exhaustive_estimate(frame)),
            "definition": (
                f"the norm at layer {self.setup['layer']} enters the sink regime (>= "
                f"{sink_threshold(self.setup['first_token_norm'], self.setup['typical_norm']):.1f}, 0.9 of "
                "the way in log space from typical to the first token's norm) and stays there to the last "
                "repeat"
            ),
            "n_first_crossing": int(verified["first_crossing"].notna().sum()),
            "top_tokens": [
                {
                    "token_id": int(r.token_id),
                    "text": r.text,
                    "peak_ratio": float(r.peak_ratio),
                    "repeats_to_sink": None
                    if pd.isna(r.repeats_to_sink)
                    else int(r.repeats_to_sink),
                }
                for r in top.itertuples()
            ],
            "correlations": self.correlations(),
            "setup": self.setup,
        }
        return summary

    def _exhaustive_estimate(self, frame: pd.DataFrame) -> dict:
        share, low, high = proportion_interval(int(frame["reached_sink"].sum()), len(frame))
        return {
            "missing": self.requested - len(frame),
            "share_reached_sink": share,
            "ci_low": low,
            "ci_high": high,
            "estimate": "every token run in full; Wilson interval",
            "screen": None,
            "screen_recall": None,
            "screen_recall_ci_low": None,
            "screen_recall_ci_high": None,
        }

    def _screened_estimate(self, frame: pd.DataFrame) -> dict:
        """Two strata. Screen positives: all run in full, so their share is exact (or a random share of them,
        Wilson interval). Screen negatives: their share of sink-opening tokens from the calibration sample's
        negatives (Wilson interval). The share's and the recall's intervals combine the ends of both (conservative)."""
        assert self.screen is not None  # called only for a screened scan
        positive = frame["screen_positive"]
        n_positive, n_negative = int(positive.sum()), int((~positive).sum())
        run_positive = frame[positive & frame["verified"]]
        checked = frame[~positive & frame["calibration"] & frame["verified"]]
        hits, missed = int(run_positive["reached_sink"].sum()), int(checked["reached_sink"].sum())
        if len(run_positive) == n_positive:
            kept = (hits / n_positive if n_positive else 0.0,) * 3
        else:
            kept = (
                proportion_interval(hits, len(run_positive))
                if len(run_positive)
                else (math.nan, 0.0, 1.0)
            )
        if not n_negative:
            lost = (0.0, 0.0, 0.0)
        else:
            lost = (
                proportion_interval(missed, len(checked)) if len(checked) else (math.nan, 0.0, 1.0)
            )
        found = [n_positive * share for share in kept]  # estimate, low, high
        hidden = [n_negative * share for share in lost]

        def recall(true_positive: float, false_negative: float) -> float | None:
            total = true_positive + false_negative
            return None if total == 0 else _known(true_positive / total)

        n = len(frame)
        return {
            "missing": self.requested - n + int((frame["due"] & ~frame["verified"]).sum()),
            "share_reached_sink": _known((found[0] + hidden[0]) / n),
            "ci_low": (found[1] + hidden[1]) / n,
            "ci_high": (found[2] + hidden[2]) / n,
            "estimate": (
                "stratified over the tokens asked for: screen positives run in full (all, or a random share: "
                "Wilson interval), the screen negatives' share from the calibration sample's negatives "
                "(Wilson interval); intervals combine the ends of both"
            ),
            "screen": {
                **self.screen,
                "n_screen_positive": n_positive,
                "n_screen_negative": n_negative,
                "n_positives_run": len(run_positive),
                "n_calibration_negatives_run": len(checked),
                "n_missed_in_calibration": missed,
            },
            "screen_recall": recall(found[0], hidden[0]),
            "screen_recall_ci_low": recall(found[1], hidden[2]),
            "screen_recall_ci_high": recall(found[2], hidden[1]),
        }


def _known(value: float) -> float | None:
    """None for a quantity the rows cannot estimate (NaN: no token of a stratum was run in full)."""
    return None if math.isnan(value) else value


def merge_scan(out: str | Path, token_ids: Sequence[int] | None = None) -> VocabScan:
    """Every shard's rows in ``out`` as one table, for the tokens asked for: ``token_ids``, else the latest
    request recorded in ``out`` (else, for a directory that recorded none, every token it holds). A screened
    scan's calibration sample is drawn from that request, as :func:`run_scan` drew it. Written to
    ``out/scan.parquet`` atomically."""
    out = Path(out)
    if not (out / SETUP_FILE).is_file():
        raise SinklensError(f"{out} holds no scan", "run: sinklens scan --out DIR")
    setup = json.loads((out / SETUP_FILE).read_text(encoding="utf-8"))
    full, screen = all_rows(out), stored_screen(out)
    if token_ids is None:
        token_ids = stored_request(out)
    if screen is None:
        rows = {t: {**row, "verified": True} for t, row in full.items()}
    else:
        measured, screened = ScanSetup.from_json(setup), all_rows(out, "screen")
        calibration, eligible = screen_draws(
            list(screened) if token_ids is None else token_ids, screen
        )
        rows = {}
        for t, short in screened.items():
            score, positive = screen_score(short, measured), screen.positive(short, measured)
            rows[t] = {
                "token_id": t,
                "text": short["text"],
                "verified": t in full,
                "calibration": t in calibration,
                "screen_score": score,
                "screen_positive": positive,
                "screen_peak_ratio": short["peak_ratio"],
                "due": runs_in_full(t, positive, calibration, eligible),
                **full.get(t, {"reached_sink": positive}),
            }
    wanted = list(rows) if token_ids is None else [t for t in token_ids if t in rows]
    if not wanted:
        raise SinklensError(f"{out} holds no scanned token yet", "run: sinklens scan --out DIR")
    result = VocabScan(
        setup,
        [rows[t] for t in wanted],
        len(rows) if token_ids is None else len(token_ids),
        None if screen is None else screen._asdict(),
    )
    with atomic_path(out / TABLE_FILE) as tmp:
        result.to_frame().to_parquet(tmp, index=False)
    return result
