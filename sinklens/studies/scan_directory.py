"""A vocabulary scan written to a directory: what ``sinklens scan`` runs, callable from Python.

:func:`scan_into` chooses the tokens (a seeded stratified sample, or the ids given), measures or reuses the
scan's setup (a directory that already holds a scan keeps its setup, so shards and resumed runs share one),
then scans this process's shard, or every shard as Ray tasks, and, unless it ran one shard of several,
merges every shard's rows into ``scan.parquet`` and writes ``summary.json``. Everything lands in the
directory as it is measured, so the same call after an interruption scans only what is missing.
:mod:`sinklens.present.scan_page` adds the page.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from sinklens._io import check_output_dir, write_json
from sinklens.defaults import SCAN_TOKENS
from sinklens.errors import SinklensError
from sinklens.load.models import placement
from sinklens.run.tokens import check_context, encode
from sinklens.settings import Settings
from sinklens.studies.scan import (
    Written,
    batch_for,
    check_token_ids,
    run_scan,
    scan_setup,
    select_tokens,
)
from sinklens.studies.scan_store import Screen, prepare_scan_dir, stored_setup
from sinklens.studies.sweep import PartFailed, connect_ray, default_shards, scan_shards
from sinklens.studies.vocab_scan import VocabScan, merge_scan

SUMMARY_FILE = "summary.json"
DEFAULT_SCREEN = Screen()  # the screen of sinklens.defaults


@dataclass
class ScanDirectory:
    """What :func:`scan_into` left in ``out``: one shard's additions (``written``, when it ran one shard of
    several), or the merged ``scan`` and its ``summary`` (``summary.json``: the scan's summary with where the
    model ran, the batch size and the seed)."""

    out: Path
    shard: tuple[int, int]
    written: Written | None = None
    scan: VocabScan | None = None
    summary: dict[str, Any] | None = None


def scan_into(
    out: str | Path,
    settings: Settings | None = None,
    *,
    tokens: int | None = SCAN_TOKENS,
    token_ids: Sequence[int] | None = None,
    prefix: str = "",
    screen: Screen | None = DEFAULT_SCREEN,
    shard: tuple[int, int] = (1, 1),
    ray: str | None = None,
    shards: int | None = None,
    batch_size: int | None = None,
    seed: int = 0,
    model: TransformerBridge | None = None,
    verbose: bool = False,
    progress: bool = False,
) -> ScanDirectory:
    """Scan ``settings.model``'s vocabulary into ``out``.

    ``tokens``: a seeded sample of that many tokens stratified by token id (None: every token), unless
    ``token_ids`` names them. ``prefix``: text between the first token and the repeats. ``screen``: the short
    first pass (None: every token in full). ``shard=(i, n)``: only every n-th token from the i-th (1-based),
    as one of n independent jobs; the call with ``(1, 1)`` scans what is missing and merges. ``ray``: run
    ``shards`` shard tasks (default: one per GPU, else one per two CPUs) on the Ray cluster at this address
    (``"local"``: a new local instance). ``model``: an already loaded model (default: load the layers the
    scan reads; ``verbose`` shows the loading libraries' own progress and notices).
    """
    settings = settings or Settings()
    settings.check()
    if shards is not None and ray is None:
        raise SinklensError(
            "--shards splits a scan into Ray tasks and needs --ray",
            "add --ray, or run the shards as your own jobs with --shard i/n",
        )
    if ray is not None and shard != (1, 1):
        raise SinklensError(
            "--ray splits the scan into shards itself", "drop --shard, or drop --ray"
        )
    out = check_output_dir(out)
    text = settings.corpus_text()
    if ray is not None:
        connect_ray(ray)
    model = model or settings.load_model(verbose, early_layers_only=True)
    where = placement(model)
    batch_size = batch_size or batch_for(model)
    asked = (
        check_token_ids(model, token_ids)
        if token_ids is not None
        else select_tokens(model, tokens, seed=seed)
    )
    prefix_ids = tuple(encode(model, prefix)) if prefix else ()
    check_context(model, 1 + len(prefix_ids) + settings.n_repeats)
    setup = stored_setup(
        out, model.cfg.model_name, dataclasses.asdict(settings), prefix_ids
    ) or scan_setup(model, text, settings, prefix=prefix)
    if ray is not None:
        prepare_scan_dir(out, setup, screen, asked)
        del model  # each Ray task loads its own
        parts = scan_shards(
            settings,
            setup,
            asked,
            out,
            shards or default_shards(),
            batch_size=batch_size,
            screen=screen,
        )
        lost = [part for part in parts if isinstance(part, PartFailed)]
        if lost:
            raise SinklensError(
                f"{len(lost)} of {len(parts)} shards did not finish ({lost[0].name}: {lost[0].error})",
                "run the same command again: the rows written are kept and only the rest is scanned",
            )
    else:
        written = run_scan(
            model,
            setup,
            asked,
            out,
            shard=shard,
            batch_size=batch_size,
            screen=screen,
            progress=progress,
        )
        if shard[1] > 1:
            return ScanDirectory(out, shard, written=written)
    scan = merge_scan(out, asked)
    summary = {**scan.summary(), **where, "batch_size": batch_size, "seed": seed}
    write_json(out / SUMMARY_FILE, summary)
    return ScanDirectory(out, shard, scan=scan, summary=summary)
