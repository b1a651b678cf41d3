"""A patch's evaluation as a page: ``evaluation.json`` and ``evaluation.html`` from
:mod:`sinklens.studies.evaluation`, beside the paper's Table 2. :func:`run_evaluation` is what ``sinklens
evaluate`` runs: the study, then both files.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from sinklens._io import write_json, write_text
from sinklens.analyses.attention import plot_attention_received
from sinklens.analyses.benchmarks import PAPER_TABLE_2
from sinklens.analyses.norms import plot_repetition_curves
from sinklens.present.page import page, section, versions_text
from sinklens.studies.evaluation import Evaluation, EvaluationConfig, evaluate_patch


def run_evaluation(
    config: EvaluationConfig, out: str | Path, *, progress: bool = False, verbose: bool = False
) -> dict[str, Any]:
    """Measure ``config.patch`` on ``config.model`` (:func:`~sinklens.studies.evaluation.evaluate_patch`) and
    write ``evaluation.json`` and ``evaluation.html`` into ``out``. Returns the ``evaluation.json`` content."""
    evaluation = evaluate_patch(config, out, progress=progress, verbose=verbose)
    out = Path(out).expanduser()
    write_json(out / "evaluation.json", evaluation.results)
    write_text(out / "evaluation.html", render_evaluation(evaluation))
    return evaluation.results


def render_evaluation(evaluation: Evaluation) -> str:
    """The evaluation's self-contained HTML page."""
    results, patch, benchmarks = evaluation.results, evaluation.patch, evaluation.benchmarks
    (curves, curves_patched), received, generated = (
        evaluation.curves,
        evaluation.received,
        evaluation.divergence,
    )
    table2 = []
    for model, rows in PAPER_TABLE_2.items():
        for bench, (before, after) in rows.items():
            table2.append(
                {
                    "model": model,
                    "benchmark": bench,
                    "original": before,
                    "patched": after,
                    "delta": round(after - before, 2),
                }
            )
    ours = benchmarks.to_frame()[
        [
            "task",
            "n",
            "acc_original",
            "acc_patched",
            "acc_delta",
            "acc_ci_low",
            "acc_ci_high",
            "acc_norm_delta",
            "logprob_change",
            "answers_changed",
        ]
    ]
    sections = [
        section(
            "Benchmarks, original vs patched (paper Table 2)",
            "0-shot multiple choice in lm-evaluation-harness's formats, the same items for both models; the "
            "difference with a 95% interval of the per-item paired differences. The paper's Table 2 below it.",
            benchmarks.plot(),
            frame=ours,
        ),
        section(
            "The paper's Table 2",
            "Yona et al. (2025), accuracy in %, original -> patched.",
            frame=pd.DataFrame(table2),
        ),
        section(
            "Norms with the patch",
            f"Hidden-state norm at the sink layer along each repeated word, without and with the patch "
            f"({html.escape(patch.describe())}); and the attention later queries pay to the first token.",
            plot_repetition_curves(curves, curves_patched),
            plot_attention_received(*received),
        ),
        section(
            "Divergence under generation",
            "Greedy and sampled continuations of the chat-template prompt (assistant turn started with copies of "
            "the word) and of the raw repeated sequence; the teacher-forced probability of repeating the word "
            "again.",
            generated.plot(),
            frame=generated.to_frame(),
        ),
    ]
    return page(
        f"sinklens evaluation: {results['model']['name']}",
        f"Patch file <code>{html.escape(results['settings']['patch'])}</code>, preset "
        f"<code>{results['preset']}</code>. {html.escape(versions_text(results['versions']))}. Every number "
        "here is in <code>evaluation.json</code>.",
        results["summary"],
        sections,
    )
