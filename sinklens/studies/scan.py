"""Which tokens open the sink: a vocabulary scan at the sink layer.

The paper shows a handful of words whose long repetition reaches the first token's norm and asks
why some tokens do and others never do. The scan measures every token of a vocabulary (or a
seeded sample stratified by token id, the tokenizer's merge order and so a proxy for frequency
rank): ``[first] + prefix + [token] * n`` is run up to the sink layer only, and per token it records

* the peak and the final hidden-state norm at the sink layer over the typical norm of natural text;
* whether and after how many repeats the norm enters the sink regime (the same threshold as the norm
  curves: 0.9 of the way, in log space, from typical to the first token's norm) to stay, and where
  it first crosses it;
* the sink neurons' largest activation over the repeats, relative to the first token's;
* three candidate explanations: the embedding norm, how "first-like" the top first-detector neuron
  finds the last repeat (0: like a later token, 1: like the first token), and how close layer 0's
  output at the last repeat is to that of the token standing alone (cosine).

A whole vocabulary at a thousand repeats is many CPU hours, so by default the scan is *screened*
(:class:`Screen`): every token gets a short run first, and only the tokens whose short run already
heads toward the sink, plus a random calibration sample of the rest, get the full run. Every screen
positive is measured in full, so their count is exact; the calibration sample's screen negatives
estimate how many sink-opening tokens the screen missed, which gives the share over the request
with an interval and the screen's recall, measured on every run. ``screen=None`` runs every token in
full (``sinklens scan --exhaustive``).

Rows are appended to JSON-lines files per shard as each batch finishes (``screen-*`` for the short
runs, ``rows-*`` for the full ones), so a killed scan resumes where it stopped; ``shard=(i, n)``
takes every n-th token from the i-th (1-based: ``(1, 4)`` ... ``(4, 4)``), so independent jobs can
fill one directory, and :func:`merge_scan` reads every shard's rows into one table (tokens scanned
twice are kept once). :func:`scan_setup` fixes what the rows depend on and is stored beside them
with the screen, so a resumed or sharded run refuses other settings.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from scipy import stats
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses._stats import proportion_interval
from sinklens.analyses.first_detector import first_detector_neurons
from sinklens.analyses.norms import (
    first_crossing,
    repeats_to_stay,
    resid_norms,
    sink_threshold,
)
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.results import Result
from sinklens.run.cache import run_cache
from sinklens.run.tokens import check_context, encode, repeated_tokens
from sinklens.settings import SCAN_BATCH, Settings
from sinklens.studies.scan_store import (
    SETUP_FILE,
    TABLE_FILE,
    RowFile,
    ScanSetup,
    Screen,
    all_rows,
    prepare_scan_dir,
    row_file,
    scan_settings,
    screen_score,
    stored_request,
    stored_screen,
)
from sinklens.studies.setup import CircuitSetup, circuit_setup

N_STRATA = 10
SCREEN_BATCH = 32  # tokens per short run: 29.9, 27.4 and 26.6 ms per token at batches of 16, 32 and 64
FEATURES = ("token_id", "embedding_norm", "first_detector_score", "layer0_lone_cosine")


def scan_setup(model: TransformerBridge, text: str | None = None, settings: Settings | None = None, *,
               prefix: str = "", setup: CircuitSetup | None = None, **choices: Any) -> ScanSetup:
    """Measure what the scan needs once: the circuit setup (:func:`~sinklens.studies.setup.circuit_setup` on
    natural ``text`` with ``settings``, or ``choices`` in place of its fields; ``settings.n_repeats`` is the
    scan's repeats), the sink neurons' activation on the first token, the typical and first-token norms at
    the (last) sink layer, and the top first-detector neuron (read on the whole ``text``). ``setup`` reuses a
    circuit setup measured with the same settings."""
    settings = Settings.of(settings, **choices)
    text = settings.corpus_text() if text is None else text
    setup = setup or circuit_setup(model, text, settings)
    if not setup.sink_found:
        raise SinklensError(f"{setup.model} has no sink to scan for: {setup.choice.reason}",
                            "check `sinklens table`: the scan measures repeats against the first token's sink")
    if not setup.sink_neurons:
        raise SinklensError(f"{setup.model} has no sink neurons to scan for",
                            "check `sinklens neurons`: the scan needs a sink")
    prefix_ids = tuple(encode(model, prefix)) if prefix else ()
    check_context(model, 1 + len(prefix_ids) + settings.n_repeats)
    layer = max(l for l, _ in setup.sink_neurons)
    reference, first = setup.reference, setup.first.id
    norms = resid_norms(model, reference, layer)[0]
    names = sorted({get_act_name("post", l) for l, _ in setup.sink_neurons})
    cache = run_cache(model, reference[:, :1], names)
    sink_first = tuple(float(cache[get_act_name("post", l)][0, 0, n]) for l, n in setup.sink_neurons)
    detectors = first_detector_neurons(model, text, repeated_tokens(model, reference[0, 1].item(), 8, first=first),
                                       sink_layer=layer, top=1)
    (d_layer, d_neuron), = detectors.top
    index = detectors.layers.index(d_layer)
    return ScanSetup(
        model.cfg.model_name, first, prefix_ids, settings.n_repeats, layer,
        tuple((int(l), int(n)) for l, n in setup.sink_neurons), float(norms[1:].mean()), float(norms[0]), sink_first,
        (int(d_layer), int(d_neuron)), float(detectors.means[0, index, d_neuron]),
        float(detectors.means[1, index, d_neuron]), placement(model)["dtype"], scan_settings(setup.settings))


def select_tokens(model: TransformerBridge, n: int | None = None, *, seed: int = 0) -> list[int]:
    """Token ids to scan: every ordinary (non-special) token, or ``n`` of them in a seeded sample
    stratified into equal bins of token id (a proxy for frequency rank)."""
    special = set(model.tokenizer.all_special_ids)
    ids = np.array([i for i in range(model.cfg.d_vocab) if i not in special and i < len(model.tokenizer)])
    if n is None or n >= len(ids):
        return ids.tolist()
    rng = np.random.default_rng(seed)
    strata = np.array_split(ids, N_STRATA)
    counts = [n // N_STRATA + (s < n % N_STRATA) for s in range(N_STRATA)]
    return sorted(int(t) for stratum, k in zip(strata, counts) for t in rng.choice(stratum, k, replace=False))


def check_token_ids(model: TransformerBridge, token_ids: Sequence[int]) -> list[int]:
    """The ids as a list, or one clear error for an empty subset or an id outside the vocabulary."""
    ids = list(dict.fromkeys(int(t) for t in token_ids))
    if not ids:
        raise SinklensError("the token subset is empty", "pass at least one token id, or --tokens N|all")
    outside = [t for t in ids if not 0 <= t < model.cfg.d_vocab]
    if outside:
        raise SinklensError(f"token ids {outside[:5]} are outside the vocabulary (0..{model.cfg.d_vocab - 1})",
                            "pass ids of this model's vocabulary")
    return ids


def scan_rows(model: TransformerBridge, setup: ScanSetup, token_ids: Sequence[int]) -> list[dict]:
    """Measure ``token_ids`` repeated (one batch): one row per token."""
    ids = torch.tensor(list(token_ids), dtype=torch.long)
    start = len(setup.prefix) + 1  # position of the first repeat
    tokens = repeated_batch(setup, ids[:, None].expand(-1, setup.n_repeats))
    sink_layers = sorted({l for l, _ in setup.sink_neurons})
    d_layer, d_neuron = setup.detector
    resid = get_act_name("resid_post", setup.layer)
    posts = {l: get_act_name("post", l) for l in sink_layers}
    detector = get_act_name("pre", d_layer)
    layer0 = get_act_name("resid_post", 0)

    def reduce(name: str, activation: torch.Tensor) -> torch.Tensor:
        if name == resid:
            return activation.float().norm(dim=-1)
        if name == layer0:
            return activation[:, -1].float()
        if name == detector:
            return activation[:, :, d_neuron].float()
        layer = next(l for l, n in posts.items() if n == name)
        return activation[:, :, [n for l, n in setup.sink_neurons if l == layer]].float()

    cache = run_cache(model, tokens, [resid, *posts.values(), detector, layer0], reduce=reduce)
    lone = run_cache(model, ids[:, None], [layer0])[layer0][:, 0]
    norms = cache[resid].cpu()
    columns = {l: [n for layer, n in setup.sink_neurons if layer == l] for l in sink_layers}
    neuron_values = torch.stack([cache[posts[l]][:, :, columns[l].index(n)] for l, n in setup.sink_neurons],
                                dim=-1)[:, start:].cpu()  # in the order of setup.sink_neurons
    neuron_ratio = (neuron_values / torch.tensor(setup.sink_neuron_first).clamp_min(1e-6)).amax(dim=(1, 2))
    span = setup.detector_first - setup.detector_later
    detector_score = (cache[detector][:, -1].cpu() - setup.detector_later) / (span if abs(span) > 1e-9 else 1.0)
    cosine = torch.nn.functional.cosine_similarity(cache[layer0], lone, dim=-1).cpu()
    embedding = model.W_E.detach()[ids.to(model.W_E.device)].float().norm(dim=-1).cpu()
    threshold = setup.threshold
    rows = []
    for b, token_id in enumerate(ids.tolist()):
        curve = torch.cat([norms[b, :1], norms[b, start:]])  # position n = the n-th repeat
        stay, crossing = repeats_to_stay(curve, threshold), first_crossing(curve, threshold)
        rows.append({
            "token_id": token_id, "text": model.tokenizer.decode([token_id]),
            "peak_ratio": float(curve[1:].max()) / setup.typical_norm,
            "final_ratio": float(curve[-1]) / setup.typical_norm,
            "reached_sink": stay is not None, "repeats_to_sink": stay, "first_crossing": crossing,
            "sink_neuron_ratio": float(neuron_ratio[b]), "embedding_norm": float(embedding[b]),
            "first_detector_score": float(detector_score[b]), "layer0_lone_cosine": float(cosine[b]),
        })
    return rows


class Written(NamedTuple):
    """What one call of :func:`run_scan` added: tokens screened and tokens run in full."""

    screened: int
    full: int


def screen_draws(token_ids: Sequence[int], screen: Screen) -> tuple[set[int], set[int]]:
    """The random parts of a screened scan, drawn with ``screen.seed`` from the sorted request (so every shard
    draws the same): the calibration sample (``screen.calibration`` tokens run in full whatever the screen says),
    and the tokens that get a full run if the screen finds them positive (each with probability
    ``screen.positives``)."""
    ids = np.array(sorted(set(int(t) for t in token_ids)))
    rng = np.random.default_rng(screen.seed)
    calibration = rng.choice(ids, min(screen.calibration, len(ids)), replace=False)
    eligible = ids[rng.random(len(ids)) < screen.positives]
    return {int(t) for t in calibration}, {int(t) for t in eligible}


def _due(token: int, positive: bool, calibration: set[int], eligible: set[int]) -> bool:
    """Whether a screened scan runs ``token`` in full: a calibration token, or a screen positive drawn for it."""
    return token in calibration or positive and token in eligible


def run_scan(model: TransformerBridge, setup: ScanSetup, token_ids: Sequence[int], out: str | Path, *,
             shard: tuple[int, int] = (1, 1), batch_size: int = SCAN_BATCH, screen: Screen | None = None,
             progress: bool = False) -> Written:
    """Scan this shard's part of ``token_ids`` (every ``shard[1]``-th, from the ``shard[0]``-th, 1-based) into
    ``out``, skipping tokens any shard has already written.

    Without a ``screen`` every token gets a full run (``setup.n_repeats`` repeats). With one, every token
    first gets the screen's short run, then the screen positives (or the share ``screen.positives`` of them) and
    the calibration sample get full runs.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_scan_dir(out, setup, screen, token_ids)
    mine = list(token_ids)[shard[0] - 1 :: shard[1]]
    label = f"shard {shard[0]}/{shard[1]}"
    screened = 0
    if screen is not None:
        done = all_rows(out, "screen")
        todo = [t for t in mine if t not in done]
        _append_rows(model, replace(setup, n_repeats=screen.n_repeats), todo, row_file(out, "screen", shard),
                     SCREEN_BATCH, f"screen {label}", progress)
        screened, scores = len(todo), all_rows(out, "screen")
        calibration, eligible = screen_draws(token_ids, screen)
        mine = [t for t in mine if _due(t, screen.positive(scores[t], setup), calibration, eligible)]
    done = all_rows(out)
    todo = [t for t in mine if t not in done]
    _append_rows(model, setup, todo, row_file(out, "rows", shard), batch_size, f"full runs {label}", progress)
    return Written(screened, len(todo))


def _append_rows(model: TransformerBridge, setup: ScanSetup, todo: Sequence[int], target: RowFile, batch_size: int,
                 desc: str, progress: bool) -> None:
    with tqdm(total=len(todo), desc=desc, unit="token", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            target.append(scan_rows(model, setup, batch))
            bar.update(len(batch))


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
        result = []
        if len(frame) < 4:
            return result
        for feature in FEATURES:
            rho, p = stats.spearmanr(frame[feature], frame["peak_ratio"])
            n = len(frame)
            half = 1.96 / math.sqrt(n - 3)
            low, high = (math.tanh(math.atanh(max(min(rho, 0.999999), -0.999999)) + s * half) for s in (-1, 1))
            result.append({"feature": "frequency rank (token id)" if feature == "token_id" else feature,
                           "spearman_with_peak_ratio": float(rho), "ci_low": low, "ci_high": high, "n": n,
                           "p_value": float(p)})
        return result

    def plot(self) -> go.Figure:
        frame = self.to_frame()
        frame = frame[frame["verified"]]
        fig = make_subplots(rows=1, cols=2, subplot_titles=["Peak norm over typical (log10)",
                                                            "Peak norm vs token id (frequency-rank proxy)"])
        fig.add_histogram(x=np.log10(frame["peak_ratio"]), nbinsx=80, name="tokens", row=1, col=1)
        for reached, colour in ((False, "steelblue"), (True, "firebrick")):
            part = frame[frame["reached_sink"] == reached]
            fig.add_scatter(x=part["token_id"], y=part["peak_ratio"], mode="markers", marker={"size": 3, "color": colour},
                            text=part["text"], name="reached the sink" if reached else "did not", row=1, col=2)
        fig.update_yaxes(type="log", row=1, col=2)
        fig.update_layout(title=f"Vocabulary scan: {len(frame)} tokens run in full, {self.setup['n_repeats']} repeats",
                          height=450)
        return fig

    def summary(self) -> dict:
        frame = self.to_frame()
        verified = frame[frame["verified"]]
        top = verified.sort_values("peak_ratio", ascending=False).head(20)
        summary = {
            "n_tokens": len(frame), "n_repeats": self.setup["n_repeats"],
            "n_reached_sink": int(verified["reached_sink"].sum()), "n_verified": len(verified),
            **(self._screened_estimate(frame) if self.screen else self._exhaustive_estimate(frame)),
            "definition": (f"the norm at layer {self.setup['layer']} enters the sink regime (>= "
                           f"{sink_threshold(self.setup['first_token_norm'], self.setup['typical_norm']):.1f}, 0.9 of "
                           "the way in log space from typical to the first token's norm) and stays there to the last "
                           "repeat"),
            "n_first_crossing": int(verified["first_crossing"].notna().sum()),
            "top_tokens": [{"token_id": int(r.token_id), "text": r.text, "peak_ratio": float(r.peak_ratio),
                            "repeats_to_sink": None if pd.isna(r.repeats_to_sink) else int(r.repeats_to_sink)}
                           for r in top.itertuples()],
            "correlations": self.correlations(),
            "setup": self.setup,
        }
        return summary

    def _exhaustive_estimate(self, frame: pd.DataFrame) -> dict:
        share, low, high = proportion_interval(int(frame["reached_sink"].sum()), len(frame))
        return {"missing": self.requested - len(frame), "share_reached_sink": share, "ci_low": low, "ci_high": high,
                "estimate": "every token run in full; Wilson interval", "screen": None, "screen_recall": None,
                "screen_recall_ci_low": None, "screen_recall_ci_high": None}

    def _screened_estimate(self, frame: pd.DataFrame) -> dict:
        """Two strata. Screen positives: all run in full, so their share is exact (or a random share of them,
        Wilson interval). Screen negatives: their share of sink-opening tokens from the calibration sample's
        negatives (Wilson interval). The share's and the recall's intervals combine the ends of both (conservative)."""
        positive = frame["screen_positive"]
        n_positive, n_negative = int(positive.sum()), int((~positive).sum())
        run_positive = frame[positive & frame["verified"]]
        checked = frame[~positive & frame["calibration"] & frame["verified"]]
        hits, missed = int(run_positive["reached_sink"].sum()), int(checked["reached_sink"].sum())
        if len(run_positive) == n_positive:
            kept = (hits / n_positive if n_positive else 0.0,) * 3
        else:
            kept = proportion_interval(hits, len(run_positive)) if len(run_positive) else (math.nan, 0.0, 1.0)
        if not n_negative:
            lost = (0.0, 0.0, 0.0)
        else:
            lost = proportion_interval(missed, len(checked)) if len(checked) else (math.nan, 0.0, 1.0)
        found = [n_positive * share for share in kept]  # estimate, low, high
        hidden = [n_negative * share for share in lost]

        def recall(true_positive: float, false_negative: float) -> float | None:
            total = true_positive + false_negative
            return None if total == 0 else _known(true_positive / total)

        n = len(frame)
        return {
            "missing": self.requested - n + int((frame["due"] & ~frame["verified"]).sum()),
            "share_reached_sink": _known((found[0] + hidden[0]) / n), "ci_low": (found[1] + hidden[1]) / n,
            "ci_high": (found[2] + hidden[2]) / n,
            "estimate": ("stratified over the tokens asked for: screen positives run in full (all, or a random share: "
                         "Wilson interval), the screen negatives' share from the calibration sample's negatives "
                         "(Wilson interval); intervals combine the ends of both"),
            "screen": {**self.screen, "n_screen_positive": n_positive, "n_screen_negative": n_negative,
                       "n_positives_run": len(run_positive), "n_calibration_negatives_run": len(checked),
                       "n_missed_in_calibration": missed},
            "screen_recall": recall(found[0], hidden[0]), "screen_recall_ci_low": recall(found[1], hidden[2]),
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
    from sinklens._io import atomic_path

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
        calibration, eligible = screen_draws(list(screened) if token_ids is None else token_ids, screen)
        rows = {}
        for t, short in screened.items():
            score, positive = screen_score(short, measured), screen.positive(short, measured)
            rows[t] = {"token_id": t, "text": short["text"], "verified": t in full, "calibration": t in calibration,
                       "screen_score": score, "screen_positive": positive, "screen_peak_ratio": short["peak_ratio"],
                       "due": _due(t, positive, calibration, eligible), **full.get(t, {"reached_sink": positive})}
    wanted = list(rows) if token_ids is None else [t for t in token_ids if t in rows]
    if not wanted:
        raise SinklensError(f"{out} holds no scanned token yet", "run: sinklens scan --out DIR")
    result = VocabScan(setup, [rows[t] for t in wanted], len(rows) if token_ids is None else len(token_ids),
                       None if screen is None else screen._asdict())
    with atomic_path(out / TABLE_FILE) as tmp:
        result.to_frame().to_parquet(tmp, index=False)
    return result


def scan_tokens(model: TransformerBridge, setup: ScanSetup, token_ids: Sequence[int], *, batch_size: int = SCAN_BATCH,
                progress: bool = False) -> VocabScan:
    """Scan ``token_ids`` in full, in memory (no files): for small scans and for the cluster attack."""
    rows = []
    for start in tqdm(range(0, len(token_ids), batch_size), desc="scan", unit="batch", disable=not progress):
        rows += [{**row, "verified": True} for row in scan_rows(model, setup, token_ids[start : start + batch_size])]
    return VocabScan(setup.to_json(), rows, len(token_ids))


def repeated_batch(setup: ScanSetup, sequences: Int[torch.Tensor, "batch n"]) -> Int[torch.Tensor, "batch pos"]:
    """``[first] + prefix + sequence`` for each row."""
    head = torch.tensor([[setup.first_token, *setup.prefix]]).expand(sequences.shape[0], -1)
    return torch.cat([head, sequences], dim=1)
