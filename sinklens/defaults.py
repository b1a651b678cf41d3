"""The defaults and menus of the studies beyond the shared :class:`~sinklens.settings.Settings`.

Each study takes these as the defaults of its own arguments (``cluster_attack(lengths=ATTACK_LENGTHS)``),
and each command shows them in ``--help``. They live here, in plain Python, because the command line
parses and checks its arguments before torch or TransformerLens is imported: a command that read a
default from its study's module would load torch to print ``--help``. Grouped by the study that owns
them; the choices every study shares (repeats, the sink-layer rule, the sink-neuron filter) are
:class:`~sinklens.settings.Settings` fields instead.
"""

from __future__ import annotations

from typing import Any

# The vocabulary scan (sinklens.studies.scan). The default screen was chosen against an exhaustive scan of
# 2,000 SmolLM2 tokens at 1000 repeats (docs/results.md): of short runs of 8, 16, 32 and 64 repeats, 32 costs
# half of 64's screen (27 against 57 ms per token) for full runs on 55% of the tokens instead of 49%; 0.26
# keeps 97% of a random half's sink-opening tokens, 97.9% of the other's.
SCAN_TOKENS = 2000  # tokens in the default stratified sample
SCREEN_REPEATS = 32
SCREEN_THRESHOLD = 0.26
SCREEN_CALIBRATION = (
    500  # tokens run in full whatever the screen says: about 350 screen negatives on SmolLM2
)
SCREEN_POSITIVES = 1.0  # share of the screen positives run in full

# The cluster attack (sinklens.studies.attack).
ATTACK_TOKENS = 400  # the attack's own scan when it is given none
ATTACK_LENGTHS = (100, 300, 1000)  # sequence lengths
ATTACK_SEQUENCES = 40  # sequences per condition and length
CLUSTERINGS = (
    "keys",
    "sink_tokens",
)  # k-means on layer-0 keys, or the tokens that reach the sink alone

# The first-token mark (sinklens.analyses.first_token_mark): corrupted runs per patching experiment.
MARK_CONTEXTS = 8

# The sink patch (sinklens.run.sink_patch): where it clamps (the MLP hook it acts on) and to what value.
PATCH_HOOKS = {"up": "pre_linear", "gate": "pre", "post": "post"}
PATCH_VALUES = ("first_after_start", "calibrated")

# The patch evaluation (sinklens.studies.evaluation): smoke takes minutes on a CPU, full is the report.
EVALUATION_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": {
        "items": 20,
        "lambada": 20,
        "text_tokens": 1024,
        "words": ("poem",),
        "chat_copies": 10,
        "raw_repeats": (64,),
        "new_tokens": 24,
        "seeds": (0,),
        "teacher_repeats": 200,
        "n_repeats": 300,
    },
    "full": {
        "items": 200,
        "lambada": 500,
        "text_tokens": 16384,
        "words": None,
        "chat_copies": 10,
        "raw_repeats": (100, 1000),
        "new_tokens": 128,
        "seeds": (0, 1),
        "teacher_repeats": 1000,
        "n_repeats": 1000,
    },
}

# Sweeps (sinklens.studies.sweep): run on a new local Ray instance rather than join a cluster.
RAY_LOCAL = "local"

# Activation-patching sweeps (sinklens.analyses.patching_sweep): the kinds of site, and the metrics the command
# offers (any callable from Python).
PATCHING_SITES = ("resid_pre", "attn_out", "mlp_out", "heads", "head_positions")
PATCHING_METRICS = ("first_token_norm", "sink_neurons", "attention", "logit_diff")
PATCHING_TOKENS = (
    16  # tokens of natural text after the first token in the default clean/corrupted pair
)
