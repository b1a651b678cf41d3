"""sinklens: find, explain and patch the attention-sink circuit behind repeated-token divergence.

Built on TransformerLens 4 (``TransformerBridge``). The package follows the flow of a study:
``load`` (models, data) -> ``run`` (inputs, hooks, caches) -> ``analyses`` (one module each) ->
``present`` (report, command line). Start with :func:`load_model`, then run an analysis; each
returns a result with tensors, ``to_frame()``, ``plot()`` and ``summary()``. Every public name is
importable from here.
"""

from sinklens.analyses import attention
from sinklens.analyses.ablation import AblationStudy, ablation_study
from sinklens.analyses.circuit import FirstLayerCircuit, first_layer_circuit
from sinklens.analyses.convergence import Convergence, convergence
from sinklens.analyses.first_detector import FirstDetectorNeurons, first_detector_neurons
from sinklens.analyses.attack import ClusterAttack, cluster_attack
from sinklens.analyses.scan import (
    ScanSetup,
    Screen,
    VocabScan,
    merge_scan,
    run_scan,
    scan_setup,
    scan_tokens,
    select_tokens,
)
from sinklens.analyses.benchmarks import BenchmarkComparison, TextEffect, compare_benchmarks, score_items, text_effect
from sinklens.analyses.divergence import Divergence, divergence
from sinklens.analyses.patch_choice import PatchChoice, choose_patch
from sinklens.analyses.attention import (
    AttentionPatterns,
    AttentionReceived,
    AttentionScoreMaps,
    attention_heads_view,
    attention_patterns,
    attention_received,
    attention_score_maps,
    plot_attention_received,
    plot_attention_score_maps,
)
from sinklens.analyses.first_token import FirstTokenChoice, choose_first_token
from sinklens.analyses.heads import HeadBehaviour, head_behaviour
from sinklens.analyses.mark import MarkPatching, mark_patching
from sinklens.analyses.norms import (
    NormBaseline,
    RepetitionCurves,
    norm_baseline,
    plot_repetition_curves,
    repetition_curves,
)
from sinklens.analyses.probe import FirstTokenProbe, train_first_token_probe
from sinklens.analyses.sink_layer import SinkLayerResult, find_sink_layer
from sinklens.analyses.sink_neurons import SinkNeuronsResult, find_sink_neurons
from sinklens.analyses.table import SinkTableRow, sink_table_row
from sinklens.errors import SinklensError
from sinklens.load import corpus
from sinklens.load.benchmarks import Item, load_items
from sinklens.load.models import ModelSource, load_hf_model, load_model, placement, resolve_model
from sinklens.present.evaluation import EvaluationConfig, run_evaluation
from sinklens.present.explore import SinkExplorer, explore
from sinklens.present.report import ReportConfig, run_report
from sinklens.results import load_result, save_result
from sinklens.run.cache import SharedPrefix, run_cache, shared_prefix
from sinklens.run.interventions import ablation_hooks, mean_activations
from sinklens.run.patch import SinkPatch, patch_for
from sinklens.run.tokens import Token, default_words, first_token, repeated_tokens, text_tokens, word_token

__all__ = [
    "AblationStudy", "AttentionPatterns", "AttentionReceived", "AttentionScoreMaps", "BenchmarkComparison", "ClusterAttack",
    "Convergence", "Divergence", "EvaluationConfig", "FirstDetectorNeurons", "FirstLayerCircuit",
    "FirstTokenChoice", "FirstTokenProbe", "HeadBehaviour", "Item", "MarkPatching", "ModelSource", "NormBaseline",
    "PatchChoice", "RepetitionCurves", "ReportConfig", "ScanSetup", "Screen", "SinkLayerResult", "SinkNeuronsResult",
    "SharedPrefix", "SinkExplorer", "SinkPatch", "SinkTableRow", "SinklensError", "TextEffect", "Token", "VocabScan", "ablation_hooks",
    "ablation_study", "attention", "attention_heads_view", "attention_patterns", "attention_received", "attention_score_maps",
    "choose_first_token", "choose_patch", "cluster_attack", "compare_benchmarks", "convergence", "corpus",
    "default_words", "divergence", "explore", "find_sink_layer", "find_sink_neurons", "first_detector_neurons",
    "first_layer_circuit", "first_token", "head_behaviour", "load_hf_model", "load_items", "load_model", "placement",
    "load_result", "mark_patching", "mean_activations", "merge_scan", "norm_baseline", "patch_for",
    "plot_attention_received", "plot_attention_score_maps", "plot_repetition_curves", "repeated_tokens",
    "repetition_curves", "resolve_model", "run_cache", "run_evaluation", "run_report", "run_scan", "save_result",
    "scan_setup", "scan_tokens", "score_items", "select_tokens", "shared_prefix", "sink_table_row", "text_effect", "text_tokens",
    "train_first_token_probe", "word_token",
]
