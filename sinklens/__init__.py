"""sinklens: find, explain and patch the attention-sink circuit behind repeated-token divergence.

Built on TransformerLens 4 (``TransformerBridge``). The package follows the flow of a study:
``load`` (models, data) -> ``run`` (inputs, hooks, caches) -> ``analyses`` (one module each) ->
``studies`` (analyses composed, from one circuit setup) -> ``present`` (figures, pages, the explorer) ->
``commands`` (one module per command of ``sinklens``), with the choices every study shares in ``settings``
and the defaults of each study in ``defaults``. Start with
:func:`load_model`, then run an analysis; each returns a result with tensors, ``to_frame()``,
``plot()`` and ``summary()``. Every public name is importable from here.

``import sinklens`` is cheap: each name is imported from its module on first use (PEP 562), so the
command line answers ``--help`` and bad arguments before torch or TransformerLens is imported.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, tuple[str, ...]] = {
    "sinklens.analyses.ablation": ("AblationStudy", "ablation_study"),
    "sinklens.studies.attack": ("AttackStudy", "ClusterAttack", "attack_study", "cluster_attack"),
    "sinklens.analyses.attention": (
        "AttentionPatterns",
        "AttentionReceived",
        "AttentionScoreMaps",
        "attention_heads_view",
        "attention_patterns",
        "attention_received",
        "attention_score_maps",
        "plot_attention_received",
        "plot_attention_score_maps",
    ),
    "sinklens.analyses.benchmarks": (
        "BenchmarkComparison",
        "TextEffect",
        "compare_benchmarks",
        "score_items",
        "text_effect",
    ),
    "sinklens.studies.circuit": ("FirstLayerCircuit", "first_layer_circuit"),
    "sinklens.analyses.convergence": ("Convergence", "convergence"),
    "sinklens.analyses.divergence": ("Divergence", "divergence"),
    "sinklens.analyses.first_detector": ("FirstDetectorNeurons", "first_detector_neurons"),
    "sinklens.analyses.first_token": ("FirstTokenChoice", "choose_first_token"),
    "sinklens.analyses.heads": ("HeadBehaviour", "head_behaviour"),
    "sinklens.analyses.first_token_mark": ("FirstTokenMarkPatching", "first_token_mark_patching"),
    "sinklens.analyses.norms": (
        "NormBaseline",
        "RepetitionCurves",
        "norm_baseline",
        "plot_repetition_curves",
        "repetition_curves",
    ),
    "sinklens.analyses.sink_patch_choice": ("SinkPatchChoice", "choose_patch"),
    "sinklens.analyses.patching_sweep": (
        "PatchingMetric",
        "PatchingSweep",
        "attention_to",
        "first_token_norm",
        "logit_difference",
        "patching_sweep",
        "sink_neuron_activation",
    ),
    "sinklens.studies.patching": ("PatchingStudy", "patching_study", "sink_pair"),
    "sinklens.run.activation_patching": ("Patch", "Site", "patch_hooks"),
    "sinklens.analyses.probe": ("FirstTokenProbe", "train_first_token_probe"),
    "sinklens.studies.scan": ("run_scan", "scan_setup", "scan_tokens", "select_tokens"),
    "sinklens.studies.scan_store": ("ScanSetup", "Screen"),
    "sinklens.studies.vocab_scan": ("VocabScan", "merge_scan"),
    "sinklens.analyses.sink_layer": ("SinkLayer", "find_sink_layer"),
    "sinklens.analyses.sink_neurons": ("SinkNeurons", "find_sink_neurons"),
    "sinklens.studies.table": ("SinkTableRow", "sink_table_row"),
    "sinklens.errors": ("SinklensError",),
    "sinklens.load.benchmark_items": ("Item", "load_items"),
    "sinklens.load.models": ("load_hf_model", "load_model", "placement"),
    "sinklens.load.sources": ("ModelSource", "resolve_model"),
    "sinklens.studies.evaluation": ("Evaluation", "EvaluationConfig", "evaluate_patch"),
    "sinklens.present.evaluation_page": ("render_evaluation", "run_evaluation"),
    "sinklens.present.explore": ("SinkExplorer", "explore"),
    "sinklens.studies.report": ("Report", "report_study"),
    "sinklens.present.report_page": ("render_report", "run_report"),
    "sinklens.studies.scan_directory": ("ScanDirectory", "scan_into"),
    "sinklens.present.scan_page": ("render_scan", "write_scan"),
    "sinklens.studies.patch_search": ("PatchStudy", "find_sink_patch"),
    "sinklens.studies.sweep": ("PartFailed", "table_sweep"),
    "sinklens.results": ("load_result", "save_result"),
    "sinklens.run.cache": ("SharedPrefix", "run_cache", "shared_prefix"),
    "sinklens.run.interventions": ("ablation_hooks", "mean_activations"),
    "sinklens.run.sink_patch": ("SinkPatch", "patch_for"),
    "sinklens.run.tokens": (
        "Token",
        "chat_tokens",
        "default_words",
        "first_token",
        "repeated_tokens",
        "text_tokens",
        "word_token",
    ),
    "sinklens.settings": ("ReportConfig", "Settings"),
    "sinklens.studies.setup": ("CircuitSetup", "circuit_setup"),
    "sinklens.studies.census": ("Sink", "SinkCensus", "census_of", "find_sinks"),
}
_SUBMODULES = {"attention": "sinklens.analyses.attention", "corpus": "sinklens.load.corpus"}
_HOME = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted([*_HOME, *_SUBMODULES])


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for, and keep it."""
    if name in _SUBMODULES:
        value = importlib.import_module(_SUBMODULES[name])
    elif name in _HOME:
        value = getattr(importlib.import_module(_HOME[name]), name)
    else:
        raise AttributeError(f"module 'sinklens' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
