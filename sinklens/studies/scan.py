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

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from jaxtyping import Int
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses.first_detector import first_detector_neurons
from sinklens.analyses.norms import (
    first_crossing,
    repeats_to_stay,
    resid_norms,
)
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.load.sources import scan_batch_default
from sinklens.run.cache import run_cache
from sinklens.run.tokens import check_context, encode, repeated_tokens
from sinklens.settings import Settings
from sinklens.studies.scan_store import (
    RowFile,
    ScanSetup,
    Screen,
    all_rows,
    prepare_scan_dir,
    row_file,
    runs_in_full,
    scan_settings,
    screen_draws,
)
from sinklens.studies.setup import CircuitSetup, circuit_setup
from sinklens.studies.vocab_scan import VocabScan

N_STRATA = 10
SCREEN_BATCH = (
    32  # tokens per short run: 29.9, 27.4 and 26.6 ms per token at batches of 16, 32 and 64
)


def scan_setup(
    model: TransformerBridge,
    text: str | None = None,
    settings: Settings | None = None,
    *,
    prefix: str = "",
    setup: CircuitSetup | None = None,
    **choices: Any,
) -> ScanSetup:
    """Measure what the scan needs once: the circuit setup (:func:`~sinklens.studies.setup.circuit_setup` on
    natural ``text`` with ``settings``, or ``choices`` in place of its fields; ``settings.n_repeats`` is the
    scan's repeats), the sink neurons' activation on the first token, the typical and first-token norms at
    the (last) sink layer, and the top first-detector neuron (read on the whole ``text``). ``setup`` reuses a
    circuit setup measured with the same settings."""
    settings = Settings.of(settings, **choices)
    text = settings.corpus_text() if text is None else text
    setup = setup or circuit_setup(model, text, settings)
    if not setup.sink_found:
        raise SinklensError(
            f"{setup.model} has no sink to scan for: {setup.choice.reason}",
            "check `sinklens table`: the scan measures repeats against the first token's sink",
        )
    if not setup.sink_neurons:
        raise SinklensError(
            f"{setup.model} has no sink neurons to scan for",
            "check `sinklens neurons`: the scan needs a sink",
        )
    prefix_ids = tuple(encode(model, prefix)) if prefix else ()
    check_context(model, 1 + len(prefix_ids) + settings.n_repeats)
    layer = max(l for l, _ in setup.sink_neurons)
    reference, first = setup.reference, setup.first.id
    norms = resid_norms(model, reference, layer)[0]
    names = sorted({get_act_name("post", l) for l, _ in setup.sink_neurons})
    cache = run_cache(model, reference[:, :1], names)
    sink_first = tuple(
        float(cache[get_act_name("post", l)][0, 0, n]) for l, n in setup.sink_neurons
    )
    detectors = first_detector_neurons(
        model,
        text,
        repeated_tokens(model, int(reference[0, 1].item()), 8, first=first),
        sink_layer=layer,
        top=1,
    )
    ((d_layer, d_neuron),) = detectors.top
    index = detectors.layers.index(d_layer)
    return ScanSetup(
        model.cfg.model_name,
        first,
        prefix_ids,
        settings.n_repeats,
        layer,
        tuple((int(l), int(n)) for l, n in setup.sink_neurons),
        float(norms[1:].mean()),
        float(norms[0]),
        sink_first,
        (int(d_layer), int(d_neuron)),
        float(detectors.means[0, index, d_neuron]),
        float(detectors.means[1, index, d_neuron]),
        placement(model)["dtype"],
        scan_settings(setup.settings),
    )


def select_tokens(model: TransformerBridge, n: int | None = None, *, seed: int = 0) -> list[int]:
    """Token ids to scan: every ordinary (non-special) token, or ``n`` of them in a seeded sample
    stratified into equal bins of token id (a proxy for frequency rank)."""
    special = set(model.tokenizer.all_special_ids)
    ids = np.array(
        [i for i in range(model.cfg.d_vocab) if i not in special and i < len(model.tokenizer)]
    )
    if n is None or n >= len(ids):
        return ids.tolist()
    rng = np.random.default_rng(seed)
    strata = np.array_split(ids, N_STRATA)
    counts = [n // N_STRATA + (s < n % N_STRATA) for s in range(N_STRATA)]
    return sorted(
        int(t) for stratum, k in zip(strata, counts) for t in rng.choice(stratum, k, replace=False)
    )


def check_token_ids(model: TransformerBridge, token_ids: Sequence[int]) -> list[int]:
    """The ids as a list, or one clear error for an empty subset or an id outside the vocabulary."""
    ids = list(dict.fromkeys(int(t) for t in token_ids))
    if not ids:
        raise SinklensError(
            "the token subset is empty", "pass at least one token id, or --tokens N|all"
        )
    outside = [t for t in ids if not 0 <= t < model.cfg.d_vocab]
    if outside:
        raise SinklensError(
            f"token ids {outside[:5]} are outside the vocabulary (0..{model.cfg.d_vocab - 1})",
            "pass ids of this model's vocabulary",
        )
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
    neuron_values = torch.stack(
        [cache[posts[l]][:, :, columns[l].index(n)] for l, n in setup.sink_neurons], dim=-1
    )[:, start:].cpu()  # in the order of setup.sink_neurons
    neuron_ratio = (neuron_values / torch.tensor(setup.sink_neuron_first).clamp_min(1e-6)).amax(
        dim=(1, 2)
    )
    span = setup.detector_first - setup.detector_later
    detector_score = (cache[detector][:, -1].cpu() - setup.detector_later) / (
        span if abs(span) > 1e-9 else 1.0
    )
    cosine = torch.nn.functional.cosine_similarity(cache[layer0], lone, dim=-1).cpu()
    embedding = model.W_E.detach()[ids.to(model.W_E.device)].float().norm(dim=-1).cpu()
    threshold = setup.threshold
    rows = []
    for b, token_id in enumerate(ids.tolist()):
        curve = torch.cat([norms[b, :1], norms[b, start:]])  # position n = the n-th repeat
        stay, crossing = repeats_to_stay(curve, threshold), first_crossing(curve, threshold)
        rows.append(
            {
                "token_id": token_id,
                "text": model.tokenizer.decode([token_id]),
                "peak_ratio": float(curve[1:].max()) / setup.typical_norm,
                "final_ratio": float(curve[-1]) / setup.typical_norm,
                "reached_sink": stay is not None,
                "repeats_to_sink": stay,
                "first_crossing": crossing,
                "sink_neuron_ratio": float(neuron_ratio[b]),
                "embedding_norm": float(embedding[b]),
                "first_detector_score": float(detector_score[b]),
                "layer0_lone_cosine": float(cosine[b]),
            }
        )
    return rows


class Written(NamedTuple):
    """What one call of :func:`run_scan` added: tokens screened and tokens run in full."""

    screened: int
    full: int


def batch_for(model: TransformerBridge) -> int:
    """The default tokens per forward pass on the device ``model`` runs on."""
    return scan_batch_default(placement(model)["device"].split(",")[0])


def run_scan(
    model: TransformerBridge,
    setup: ScanSetup,
    token_ids: Sequence[int],
    out: str | Path,
    *,
    shard: tuple[int, int] = (1, 1),
    batch_size: int | None = None,
    screen: Screen | None = None,
    progress: bool = False,
) -> Written:
    """Scan this shard's part of ``token_ids`` (every ``shard[1]``-th, from the ``shard[0]``-th, 1-based) into
    ``out``, skipping tokens any shard has already written.

    Without a ``screen`` every token gets a full run (``setup.n_repeats`` repeats). With one, every token
    first gets the screen's short run, then the screen positives (or the share ``screen.positives`` of them) and
    the calibration sample get full runs. ``batch_size``: tokens per forward pass of the full runs
    (default: :func:`~sinklens.load.sources.scan_batch_default` for the model's device).
    """
    batch_size = batch_size or batch_for(model)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    prepare_scan_dir(out, setup, screen, token_ids)
    mine = list(token_ids)[shard[0] - 1 :: shard[1]]
    label = f"shard {shard[0]}/{shard[1]}"
    screened = 0
    if screen is not None:
        done = all_rows(out, "screen")
        todo = [t for t in mine if t not in done]
        _append_rows(
            model,
            replace(setup, n_repeats=screen.n_repeats),
            todo,
            row_file(out, "screen", shard),
            SCREEN_BATCH,
            f"screen {label}",
            progress,
        )
        screened, scores = len(todo), all_rows(out, "screen")
        calibration, eligible = screen_draws(token_ids, screen)
        mine = [
            t
            for t in mine
            if runs_in_full(t, screen.positive(scores[t], setup), calibration, eligible)
        ]
    done = all_rows(out)
    todo = [t for t in mine if t not in done]
    _append_rows(
        model, setup, todo, row_file(out, "rows", shard), batch_size, f"full runs {label}", progress
    )
    return Written(screened, len(todo))


def _append_rows(
    model: TransformerBridge,
    setup: ScanSetup,
    todo: Sequence[int],
    target: RowFile,
    batch_size: int,
    desc: str,
    progress: bool,
) -> None:
    with tqdm(total=len(todo), desc=desc, unit="token", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch = todo[start : start + batch_size]
            target.append(scan_rows(model, setup, batch))
            bar.update(len(batch))


def scan_tokens(
    model: TransformerBridge,
    setup: ScanSetup,
    token_ids: Sequence[int],
    *,
    batch_size: int | None = None,
    progress: bool = False,
) -> VocabScan:
    """Scan ``token_ids`` in full, in memory (no files): for small scans and for the cluster attack."""
    batch_size = batch_size or batch_for(model)
    rows = []
    for start in tqdm(
        range(0, len(token_ids), batch_size), desc="scan", unit="batch", disable=not progress
    ):
        rows += [
            {**row, "verified": True}
            for row in scan_rows(model, setup, token_ids[start : start + batch_size])
        ]
    return VocabScan(setup.to_json(), rows, len(token_ids))


def repeated_batch(
    setup: ScanSetup, sequences: Int[torch.Tensor, "batch n"]
) -> Int[torch.Tensor, "batch pos"]:
    """``[first] + prefix + sequence`` for each row."""
    head = torch.tensor([[setup.first_token, *setup.prefix]]).expand(sequences.shape[0], -1)
    return torch.cat([head, sequences], dim=1)
