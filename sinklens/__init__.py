"""sinklens: find, explain and patch the attention-sink circuit behind repeated-token divergence.

Built on TransformerLens 4 (``TransformerBridge``). Start with :func:`load_model`, then run an
analysis; each returns a result with tensors, ``to_frame()`` and ``plot()``.
"""

from sinklens import attention, corpus, plotting
from sinklens.activations import run_cache
from sinklens.attention import AttentionReceived, AttentionScoreMaps, attention_received, attention_score_maps
from sinklens.errors import SinklensError
from sinklens.loading import ModelSource, load_model, resolve_model
from sinklens.norms import NormBaseline, RepetitionCurves, norm_baseline, repetition_curves
from sinklens.report import ReportConfig, run_report
from sinklens.results import load_result, save_result
from sinklens.sink_layer import SinkLayerResult, find_sink_layer
from sinklens.tokens import Token, default_words, first_token, repeated_tokens, text_tokens, word_token

__all__ = [
    "AttentionReceived", "AttentionScoreMaps", "ModelSource", "NormBaseline", "RepetitionCurves",
    "ReportConfig", "SinkLayerResult", "SinklensError", "Token", "attention_received", "attention_score_maps",
    "default_words", "find_sink_layer", "first_token", "load_model", "load_result", "norm_baseline",
    "repeated_tokens", "repetition_curves", "resolve_model", "run_cache", "run_report", "save_result",
    "text_tokens", "word_token",
]
