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
from sinklens.analyses.attention import (
    AttentionReceived,
    AttentionScoreMaps,
    attention_heads_view,
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
from sinklens.load.models import ModelSource, load_model, resolve_model
from sinklens.present.report import ReportConfig, run_report
from sinklens.results import load_result, save_result
from sinklens.run.cache import run_cache
from sinklens.run.interventions import ablation_hooks, mean_activations
from sinklens.run.tokens import Token, default_words, first_token, repeated_tokens, text_tokens, word_token

__all__ = [
    "AblationStudy", "AttentionReceived", "AttentionScoreMaps", "Convergence", "FirstDetectorNeurons",
    "FirstLayerCircuit", "FirstTokenChoice", "FirstTokenProbe", "HeadBehaviour", "MarkPatching", "ModelSource",
    "NormBaseline", "RepetitionCurves", "ReportConfig", "SinkLayerResult", "SinkNeuronsResult", "SinkTableRow",
    "SinklensError", "Token", "ablation_hooks", "ablation_study", "attention", "attention_heads_view",
    "attention_received", "attention_score_maps", "choose_first_token", "convergence", "corpus", "default_words",
    "find_sink_layer", "find_sink_neurons", "first_detector_neurons", "first_layer_circuit", "first_token",
    "head_behaviour", "load_model", "load_result", "mark_patching", "mean_activations", "norm_baseline",
    "plot_attention_received", "plot_attention_score_maps", "plot_repetition_curves", "repeated_tokens",
    "repetition_curves", "resolve_model", "run_cache", "run_report", "save_result", "sink_table_row", "text_tokens",
    "train_first_token_probe", "word_token",
]
