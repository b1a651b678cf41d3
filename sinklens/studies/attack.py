"""The cluster attack: non-repeating sequences of tokens from one first-layer "cluster", measured.

The paper (Sec. 5) observes that tokens the first attention layer treats alike ("clusters") can
induce the sink together without any token repeating, and gives no success rate. Here a cluster is
pluggable (:data:`CLUSTERINGS`):

* ``keys``: k-means (scikit-learn) on the layer-0 keys of each token standing alone, every head's
  key normalised and concatenated: tokens whose keys are close look alike to the first attention
  layer, so a run of them could look like a lone first token as a run of one token does;
* ``sink_tokens``: behavioural; the tokens that reach the sink when repeated alone (from a scan),
  to test whether they keep each other looking "first" when mixed.

The attacked cluster is, among clusters of at least two tokens, the one with the largest share of
scanned tokens that reach the sink. Sequences of each length are sampled from it uniformly without
immediate repeats, and measured against two controls: exact repetition of one token drawn from the
same cluster, and tokens drawn from the whole scanned sample (no immediate repeats). **Success**: the
sink-layer norm of some position after the first enters the sink regime (the threshold of the
scan). With a patch, the cluster sequences are measured again with it installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses._stats import proportion_interval
from sinklens.analyses.norms import resid_norms
from sinklens.defaults import ATTACK_LENGTHS, ATTACK_SEQUENCES, ATTACK_TOKENS
from sinklens.defaults import CLUSTERINGS as CLUSTERING_NAMES
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.results import Result
from sinklens.run.cache import run_cache
from sinklens.run.sink_patch import SinkPatch
from sinklens.run.tokens import check_context
from sinklens.settings import Settings
from sinklens.studies.scan import ScanSetup, repeated_batch, scan_setup, scan_tokens, select_tokens
from sinklens.studies.scan_store import SETUP_FILE, stored_setup
from sinklens.studies.vocab_scan import VocabScan, merge_scan

CONDITIONS = ("cluster", "repeat", "random")
N_CLUSTERS = 32


def key_clusters(
    model: TransformerBridge, scan: VocabScan, *, n_clusters: int = N_CLUSTERS, seed: int = 0
) -> list[list[int]]:
    """k-means clusters of the scanned tokens by their layer-0 keys (each token alone at position 0)."""
    from sklearn.cluster import KMeans

    ids = torch.tensor([row["token_id"] for row in scan.rows])
    name = get_act_name("k", 0)
    keys = torch.cat(
        [
            run_cache(model, ids[i : i + 512, None], [name])[name][:, 0].cpu()
            for i in range(0, len(ids), 512)
        ]
    )  # [token, head, d_head]
    features = torch.nn.functional.normalize(keys, dim=-1).flatten(1).numpy()
    labels = KMeans(n_clusters=min(n_clusters, len(ids)), n_init=10, random_state=seed).fit_predict(
        features
    )
    return [ids[labels == k].tolist() for k in range(labels.max() + 1)]


def sink_token_clusters(model: TransformerBridge, scan: VocabScan, **_) -> list[list[int]]:
    """One cluster: the scanned tokens that reach the sink when repeated alone."""
    return [[row["token_id"] for row in scan.rows if row["reached_sink"]]]


CLUSTERINGS: dict[str, Callable[..., list[list[int]]]] = dict(
    zip(CLUSTERING_NAMES, (key_clusters, sink_token_clusters))
)


def choose_cluster(clusters: Sequence[Sequence[int]], scan: VocabScan) -> tuple[list[int], float]:
    """The cluster (of at least 2 tokens) with the largest share of tokens that reach the sink alone."""
    reached = {row["token_id"]: row["reached_sink"] for row in scan.rows}
    usable = [list(c) for c in clusters if len(c) >= 2]
    if not usable:
        raise SinklensError(
            "no cluster has two or more tokens", "scan more tokens, or use fewer clusters"
        )
    shares = [float(np.mean([reached.get(t, False) for t in c])) for c in usable]
    best = int(np.argmax(shares))
    return usable[best], shares[best]


def sample_sequences(
    pool: Sequence[int], n_sequences: int, length: int, *, seed: int
) -> Int[torch.Tensor, "seq n"]:
    """``n_sequences`` sequences of ``length`` tokens drawn uniformly from ``pool``, never the same token twice
    in a row."""
    rng = np.random.default_rng(seed)
    choices = np.asarray(pool)
    out = np.empty((n_sequences, length), dtype=np.int64)
    out[:, 0] = rng.choice(choices, n_sequences)
    for i in range(1, length):
        draw = rng.choice(choices, n_sequences)
        clash = draw == out[:, i - 1]
        while clash.any():
            draw[clash] = rng.choice(choices, int(clash.sum()))
            clash = draw == out[:, i - 1]
        out[:, i] = draw
    return torch.from_numpy(out)


@dataclass
class ClusterAttack(Result):
    """Per condition and sequence length: each sequence's largest sink-layer norm after the first position."""

    clustering: str
    cluster: list[int]
    cluster_texts: list[str]
    cluster_sink_share: (
        float  # share of the cluster's tokens that reach the sink when repeated alone
    )
    conditions: list[str]
    lengths: list[int]
    peak_ratio: Float[
        torch.Tensor, "condition length sequence"
    ]  # largest norm after position 0 / typical
    threshold_ratio: float  # the sink regime's edge / typical
    layer: int

    @property
    def success(self) -> torch.Tensor:
        return self.peak_ratio >= self.threshold_ratio

    def rates(self) -> pd.DataFrame:
        rows = []
        for c, condition in enumerate(self.conditions):
            for l, length in enumerate(self.lengths):
                hits, n = int(self.success[c, l].sum()), self.success.shape[-1]
                rate, low, high = proportion_interval(hits, n)
                rows.append(
                    {
                        "condition": condition,
                        "length": length,
                        "n": n,
                        "successes": hits,
                        "success_rate": rate,
                        "ci_low": low,
                        "ci_high": high,
                        "median_peak_ratio": float(self.peak_ratio[c, l].median()),
                    }
                )
        return pd.DataFrame(rows)

    def to_frame(self) -> pd.DataFrame:
        return self.rates()

    def plot(self) -> go.Figure:
        frame = self.rates()
        fig = go.Figure()
        for condition in self.conditions:
            part = frame[frame["condition"] == condition]
            fig.add_scatter(
                x=part["length"],
                y=part["success_rate"],
                name=condition,
                mode="lines+markers",
                error_y={
                    "type": "data",
                    "symmetric": False,
                    "array": part["ci_high"] - part["success_rate"],
                    "arrayminus": part["success_rate"] - part["ci_low"],
                },
            )
        fig.update_layout(
            title=f"Cluster attack ({self.clustering} clustering, {len(self.cluster)} tokens): share of "
            "sequences that reach the sink regime",
            xaxis_title="sequence length",
            yaxis_title="success rate (95% Wilson interval)",
            xaxis_type="log",
        )
        return fig

    def summary(self) -> dict:
        frame = self.rates()
        longest = frame[frame["length"] == max(self.lengths)]
        return {
            "clustering": self.clustering,
            "cluster_size": len(self.cluster),
            "cluster_tokens": self.cluster_texts[:50],
            "cluster_sink_share": self.cluster_sink_share,
            "layer": self.layer,
            "length": max(self.lengths),
            "definition": (
                f"success: the sink-layer (layer {self.layer}) norm of some position after the first reaches "
                f"the sink regime ({self.threshold_ratio:.1f}x the typical norm)"
            ),
            **{
                row["condition"]: {
                    k: row[k]
                    for k in ("n", "success_rate", "ci_low", "ci_high", "median_peak_ratio")
                }
                for row in longest.to_dict("records")
            },
            "by_length": frame.to_dict("records"),
        }


def cluster_attack(
    model: TransformerBridge,
    setup: ScanSetup,
    scan: VocabScan,
    *,
    clustering: str = "keys",
    lengths: Sequence[int] = ATTACK_LENGTHS,
    n_sequences: int = ATTACK_SEQUENCES,
    patch=None,
    seed: int = 0,
    batch_size: int = 8,
    progress: bool = False,
) -> ClusterAttack:
    """Measure the cluster attack on ``model`` with the tokens and the sink regime of ``scan``."""
    if clustering not in CLUSTERINGS:
        raise SinklensError(
            f"unknown clustering {clustering!r}", f"use one of {', '.join(CLUSTERINGS)}"
        )
    check_context(model, 1 + len(setup.prefix) + max(lengths))
    cluster, share = choose_cluster(CLUSTERINGS[clustering](model, scan, seed=seed), scan)
    everything = [row["token_id"] for row in scan.rows]
    conditions = [*CONDITIONS, *(["cluster_patched"] if patch is not None else [])]
    peaks = torch.zeros(len(conditions), len(lengths), n_sequences)
    total = len(conditions) * len(lengths)
    with tqdm(total=total, desc="cluster attack", disable=not progress) as bar:
        for l, length in enumerate(lengths):
            sequences = {
                "cluster": sample_sequences(cluster, n_sequences, length, seed=seed + l),
                "repeat": torch.tensor(
                    np.random.default_rng(seed + l).choice(cluster, n_sequences)
                )[:, None].expand(-1, length),
                "random": sample_sequences(everything, n_sequences, length, seed=seed + 1000 + l),
            }
            sequences["cluster_patched"] = sequences["cluster"]
            for c, condition in enumerate(conditions):
                peaks[c, l] = _peak_ratios(
                    model,
                    setup,
                    sequences[condition],
                    patch if condition == "cluster_patched" else None,
                    batch_size,
                )
                bar.update()
    texts = [model.tokenizer.decode([t]) for t in cluster]
    return ClusterAttack(
        clustering,
        cluster,
        texts,
        share,
        conditions,
        list(lengths),
        peaks,
        setup.threshold / setup.typical_norm,
        setup.layer,
    )


def _peak_ratios(
    model, setup: ScanSetup, sequences: torch.Tensor, patch, batch_size: int
) -> torch.Tensor:
    start = len(setup.prefix) + 1
    peaks = []
    for i in range(0, len(sequences), batch_size):
        with patch.installed(model) if patch is not None else nullcontext():
            norms = resid_norms(
                model, repeated_batch(setup, sequences[i : i + batch_size]), setup.layer
            )
        peaks.append(norms[:, start:].max(dim=-1).values / setup.typical_norm)
    return torch.cat(peaks)


class AttackStudy(NamedTuple):
    """The cluster attack with what it was measured on: the scan's setup and where the model ran."""

    attack: ClusterAttack
    setup: ScanSetup
    placement: dict[str, str]


def attack_study(
    settings: Settings | None = None,
    *,
    scan: str | Path | None = None,
    tokens: int | None = None,
    given: Collection[str] | None = None,
    clustering: str = "keys",
    lengths: Sequence[int] = ATTACK_LENGTHS,
    n_sequences: int = ATTACK_SEQUENCES,
    patch: str | Path | None = None,
    seed: int = 0,
    model: TransformerBridge | None = None,
    verbose: bool = False,
    progress: bool = False,
) -> AttackStudy:
    """What ``sinklens attack`` runs: the cluster attack on ``settings.model``.

    The tokens and the sink regime come from the scan in the directory ``scan`` (measured with its own
    settings, unless ``given`` names settings fields the caller chose, which must then agree with the scan's;
    None: the fields that differ from their defaults), or from a scan of ``tokens`` tokens made now, in memory
    (default :data:`~sinklens.defaults.ATTACK_TOKENS`). ``patch``: a patch file whose effect on the cluster
    sequences is measured too. ``model``: an already loaded model (default: load it; ``verbose`` shows the
    loading libraries' own progress and notices).
    """
    settings = settings or Settings()
    settings.check()
    sink_patch = SinkPatch.load(patch) if patch else None
    if scan is not None:
        if not (Path(scan) / SETUP_FILE).is_file():
            raise SinklensError(
                f"{scan} holds no scan", "run: sinklens scan --out DIR, then pass --scan DIR"
            )
        if tokens is not None:
            raise SinklensError(
                "--tokens sets the scan made when no --scan is given",
                "drop it: the tokens of the scan in --scan DIR are used",
            )
    model = model or settings.load_model(verbose)
    if sink_patch is not None:
        sink_patch.check(model.cfg.n_layers, model.cfg.d_mlp, model.cfg.model_name)
    check_context(model, 1 + max(lengths))
    if scan is not None:
        defaults = dataclasses.asdict(Settings())
        chosen = dataclasses.asdict(settings)
        if given is None:
            given = {k for k, v in chosen.items() if v != defaults[k]}
        setup = stored_setup(
            scan, model.cfg.model_name, {k: v for k, v in chosen.items() if k in given}
        )
        assert setup is not None  # the check above found its setup file
        scanned = merge_scan(scan)
    else:
        setup = scan_setup(model, settings.corpus_text(), settings)
        scanned = scan_tokens(
            model,
            setup,
            select_tokens(model, tokens or ATTACK_TOKENS, seed=seed),
            progress=progress,
        )
    attack = cluster_attack(
        model,
        setup,
        scanned,
        clustering=clustering,
        lengths=lengths,
        n_sequences=n_sequences,
        patch=sink_patch,
        seed=seed,
        progress=progress,
    )
    return AttackStudy(attack, setup, placement(model))
