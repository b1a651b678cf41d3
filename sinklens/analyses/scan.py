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
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Int
from plotly.subplots import make_subplots
from scipy import stats
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import write_json
from sinklens.analyses._stats import proportion_interval
from sinklens.analyses.norms import first_crossing, repeats_to_stay, resid_norms, sink_threshold
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.results import Result
from sinklens.run.cache import run_cache
from sinklens.run.tokens import check_context, encode
from sinklens.settings import SCAN_BATCH, SCREEN_CALIBRATION, SCREEN_REPEATS, SCREEN_THRESHOLD

N_STRATA = 10
SETUP_FILE = "scan.json"
SCREEN_FILE = "screen.json"
TABLE_FILE = "scan.parquet"
SCREEN_BATCH = 32  # tokens per short run: 29.9, 27.4 and 26.6 ms per token at batches of 16, 32 and 64
FEATURES = ("token_id", "embedding_norm", "first_detector_score", "layer0_lone_cosine")


@dataclass(frozen=True)
class ScanSetup:
    """What every row of a scan depends on (stored as ``scan.json`` beside the rows)."""

    model: str
    first_token: int
    prefix: tuple[int, ...]
    n_repeats: int
    layer: int  # where norms are read: the (last) sink layer
    sink_neurons: tuple[tuple[int, int], ...]
    typical_norm: float
    first_token_norm: float
    sink_neuron_first: tuple[float, ...]  # each sink neuron's activation on the first token
    detector: tuple[int, int]  # the top first-detector neuron (layer, index), read at hook_pre
    detector_first: float  # its mean value at position 0 / position 1 of natural-text chunks
    detector_later: float
    dtype: str = "float32"  # the model's precision (statistics are float32 whatever it is)

    @property
    def threshold(self) -> float:
        return sink_threshold(self.first_token_norm, self.typical_norm)

    def to_json(self) -> dict:
        data = asdict(self)
        data["prefix"], data["sink_neurons"] = list(self.prefix), [list(n) for n in self.sink_neurons]
        data["detector"], data["sink_neuron_first"] = list(self.detector), list(self.sink_neuron_first)
        return data

    @classmethod
    def from_json(cls, data: dict) -> ScanSetup:
        return cls(**{**data, "prefix": tuple(data["prefix"]), "detector": tuple(data["detector"]),
                      "sink_neurons": tuple(tuple(n) for n in data["sink_neurons"]),
                      "sink_neuron_first": tuple(data["sink_neuron_first"])})


def scan_setup(model: TransformerBridge, text: str, *, n_repeats: int = 1000, prefix: str = "",
               first: str | int | None = None) -> ScanSetup:
    """Measure what the scan needs once: the first token the model makes a sink, the sink neurons and
    their layer, the typical and first-token norms there, and the top first-detector neuron."""
    from sinklens.analyses.first_detector import first_detector_neurons
    from sinklens.analyses.first_token import choose_first_token
    from sinklens.analyses.sink_neurons import find_sink_neurons
    from sinklens.run.tokens import repeated_tokens, text_tokens

    choice = choose_first_token(model, text, given=first)
    reference = text_tokens(model, text[:1000], first=choice.token.id, max_tokens=model.cfg.n_ctx)
    neurons = find_sink_neurons(model, reference, notebook_repeats=min(n_repeats, 1000))
    if not neurons.sink_neurons:
        raise SinklensError(f"{model.cfg.model_name} has no sink neurons to scan for",
                            "check `sinklens neurons`: the scan needs a sink")
    prefix_ids = tuple(encode(model, prefix)) if prefix else ()
    check_context(model, 1 + len(prefix_ids) + n_repeats)
    layer = max(l for l, _ in neurons.sink_neurons)
    norms = resid_norms(model, reference, layer)[0]
    names = sorted({f"blocks.{l}.mlp.hook_post" for l, _ in neurons.sink_neurons})
    cache = run_cache(model, reference[:, :1], names)
    sink_first = tuple(float(cache[f"blocks.{l}.mlp.hook_post"][0, 0, n]) for l, n in neurons.sink_neurons)
    detectors = first_detector_neurons(model, text, repeated_tokens(model, reference[0, 1].item(), 8,
                                                                    first=choice.token.id), sink_layer=layer, top=1)
    (d_layer, d_neuron), = detectors.top
    index = detectors.layers.index(d_layer)
    return ScanSetup(
        model.cfg.model_name, choice.token.id, prefix_ids, n_repeats, layer,
        tuple((int(l), int(n)) for l, n in neurons.sink_neurons), float(norms[1:].mean()), float(norms[0]), sink_first,
        (int(d_layer), int(d_neuron)), float(detectors.means[0, index, d_neuron]),
        float(detectors.means[1, index, d_neuron]), placement(model)["dtype"])


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
    resid = f"blocks.{setup.layer}.hook_resid_post"
    posts = {l: f"blocks.{l}.mlp.hook_post" for l in sink_layers}
    detector = f"blocks.{d_layer}.mlp.hook_pre"
    layer0 = "blocks.0.hook_resid_post"

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


class RowFile:
    """One shard's rows as JSON lines; appends survive a kill (a torn last line is cut on reopening)."""

    def __init__(self, path: Path):
        self.path = path

    def rows(self) -> list[dict]:
        if not self.path.is_file():
            return []
        rows = []
        text = self.path.read_text(encoding="utf-8")
        for line in text.split("\n")[:-1]:  # a last segment without its newline is a torn write
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                break
        return rows

    def append(self, rows: Iterable[dict]) -> None:
        self._cut_torn_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
            f.flush()
            os.fsync(f.fileno())

    def _cut_torn_tail(self) -> None:
        if not self.path.is_file():
            return
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end != len(data):
            with self.path.open("r+b") as f:
                f.truncate(end)


class Screen(NamedTuple):
    """The cheap first pass of a screened scan (stored as ``screen.json`` beside the rows).

    Every token asked for is run with ``n_repeats`` repeats only, and its screen score is how far that
    short run's peak norm at the sink layer went from the typical norm toward the first token's, in
    log space (:func:`screen_score`: 0 at the typical norm, 1 at the first token's; the sink regime
    starts at 0.9). Tokens scoring at least ``threshold`` are run in full, and so is a seeded random
    sample of ``calibration`` tokens of the request whatever their score: the sample's screen negatives
    measure what the screen misses, so the share over the request is estimated with an interval and
    the screen's recall is measured on every run, never assumed. ``positives`` below 1 runs only that
    share of the screen positives in full (drawn at random), trading a wider interval for time.
    """

    n_repeats: int = SCREEN_REPEATS
    threshold: float = SCREEN_THRESHOLD
    calibration: int = SCREEN_CALIBRATION
    positives: float = 1.0
    seed: int = 0

    def positive(self, short_row: dict, setup: ScanSetup) -> bool:
        """Whether a token's short run makes it a screen positive."""
        return screen_score(short_row, setup) >= self.threshold


class Written(NamedTuple):
    """What one call of :func:`run_scan` added: tokens screened and tokens run in full."""

    screened: int
    full: int


def screen_score(row: dict, setup: ScanSetup) -> float:
    """How far a row's peak norm went from the typical norm toward the first token's, in log space."""
    return math.log(max(row["peak_ratio"], 1e-12)) / math.log(setup.first_token_norm / setup.typical_norm)


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


def _row_file(out: Path, kind: str, shard: tuple[int, int]) -> RowFile:
    return RowFile(out / f"{kind}-{shard[0]}-of-{shard[1]}.jsonl")


def _all_rows(out: Path, kind: str = "rows") -> dict[int, dict]:
    """Every shard's rows of one kind (``rows``: full runs, ``screen``: screen runs), each token once."""
    rows: dict[int, dict] = {}
    for path in sorted(out.glob(f"{kind}-*.jsonl")):
        for row in RowFile(path).rows():
            rows.setdefault(row["token_id"], row)
    return rows


def stored_setup(out: str | Path, model: str, n_repeats: int, prefix: tuple[int, ...]) -> ScanSetup | None:
    """The setup of the scan already in ``out`` (so shards and resumed runs share one, measured once), after
    checking that it was made on ``model`` with the same repeats and prefix; None if ``out`` holds no scan."""
    path = Path(out) / SETUP_FILE
    if not path.is_file():
        return None
    stored = ScanSetup.from_json(json.loads(path.read_text(encoding="utf-8")))
    if (stored.model, stored.n_repeats, stored.prefix) != (model, n_repeats, tuple(prefix)):
        raise SinklensError(f"{out} holds a scan of {stored.model} at {stored.n_repeats} repeats with another prefix or "
                            "model than asked", "use another --out, or the settings of the scan already there")
    return stored


def _stored_screen(out: Path) -> Screen | None:
    path = out / SCREEN_FILE
    return Screen(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def prepare_scan_dir(out: Path, setup: ScanSetup, screen: Screen | None = None) -> None:
    """Record ``setup`` and ``screen`` in ``out``, or check that the scan already there has the same ones
    (a directory holds either an exhaustive scan or a screened one, never both)."""
    path = out / SETUP_FILE
    if path.is_file():
        stored = json.loads(path.read_text(encoding="utf-8"))
        if stored != setup.to_json():
            differ = sorted(k for k in stored if stored.get(k) != setup.to_json().get(k))
            raise SinklensError(f"{out} holds a scan with other settings ({', '.join(differ)} differ)",
                                "use another --out, or the settings of the scan already there")
    stored_screen = _stored_screen(out)
    if screen is None and stored_screen is not None:
        raise SinklensError(f"{out} holds a screened scan", "drop --exhaustive, or use another --out")
    if screen is not None and stored_screen is None and any(out.glob("rows-*.jsonl")):
        raise SinklensError(f"{out} holds an exhaustive scan", "pass --exhaustive, or use another --out")
    if screen is not None and stored_screen is not None and stored_screen != screen:
        differ = [k for k in Screen._fields if getattr(stored_screen, k) != getattr(screen, k)]
        raise SinklensError(f"{out} holds a scan with another screen ({', '.join(differ)} differ)",
                            "use another --out, or the screen settings of the scan already there")
    if not path.is_file():
        write_json(path, setup.to_json())
    if screen is not None and stored_screen is None:
        write_json(out / SCREEN_FILE, screen._asdict())


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
    prepare_scan_dir(out, setup, screen)
    mine = list(token_ids)[shard[0] - 1 :: shard[1]]
    label = f"shard {shard[0]}/{shard[1]}"
    screened = 0
    if screen is not None:
        done = _all_rows(out, "screen")
        todo = [t for t in mine if t not in done]
        _append_rows(model, replace(setup, n_repeats=screen.n_repeats), todo, _row_file(out, "screen", shard),
                     SCREEN_BATCH, f"screen {label}", progress)
        screened, scores = len(todo), _all_rows(out, "screen")
        calibration, eligible = screen_draws(token_ids, screen)
        mine = [t for t in mine if _due(t, screen.positive(scores[t], setup), calibration, eligible)]
    done = _all_rows(out)
    todo = [t for t in mine if t not in done]
    _append_rows(model, setup, todo, _row_file(out, "rows", shard), batch_size, f"full runs {label}", progress)
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
    """Every shard's rows in ``out`` as one table (restricted to ``token_ids``, the tokens asked for, if given;
    else every token the directory holds), written to ``out/scan.parquet`` atomically."""
    from sinklens._io import atomic_path

    out = Path(out)
    if not (out / SETUP_FILE).is_file():
        raise SinklensError(f"{out} holds no scan", "run: sinklens scan --out DIR")
    setup = json.loads((out / SETUP_FILE).read_text(encoding="utf-8"))
    full, screen = _all_rows(out), _stored_screen(out)
    if screen is None:
        rows = {t: {**row, "verified": True} for t, row in full.items()}
    else:
        measured, screened = ScanSetup.from_json(setup), _all_rows(out, "screen")
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
