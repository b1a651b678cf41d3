"""What the sink explorer (:func:`sinklens.explore`) measures, without the widget: the same runs
from plain Python.

An explorer shows one circuit on many prompts. What does not depend on the prompt (the first
token, the sink layer and neurons, the typical norm) is measured once, by the circuit setup every
study uses (:func:`~sinklens.studies.setup.circuit_setup`), or taken from a
:class:`~sinklens.studies.table.SinkTableRow`; :func:`explorer_circuit` keeps it as an
:class:`ExplorerCircuit`, with the :class:`~sinklens.run.sink_patch.SinkPatch` that a patched run
installs (by default the paper's Listing 1 on the sink neurons found). A prompt is free text, a
word and a repeat count, or a sequence drawn from a token cluster
(:meth:`ExplorerCircuit.prompt_tokens`).

Each prompt then costs one forward pass per state, original and patched (:func:`run_prompt`),
which keeps what the explorer's views show as a :class:`PromptRun`: the hidden-state norm per
position at the sink layer and the positions the prompt holds in the sink regime there (its sinks,
as the census of :mod:`sinklens.studies.census` finds them), the attention later queries pay the
first token in every layer, the sink neurons' activations (``blocks.L.mlp.hook_post``), and one
layer's pattern, on the first and last ``PATTERN_EDGE`` positions of a long prompt. Only that layer
runs attention step by step (its pattern is read); every other layer runs fused and reports the
weight its queries pay the first token from one more fused kernel on an indicator value
(:func:`~sinklens.load.fused_attention.key_weights`: the numbers the patterns give, to float rounding).
The patch is installed for that forward pass only: the model is never left patched between runs.

The last ``RUNS_KEPT`` runs are kept, keyed by prompt, patch state and layer, and shared by every
explorer of one circuit (:meth:`ExplorerCircuit.prompt_runs`): moving the head, toggling the patch
back or returning to an earlier prompt needs no forward pass, and moving the layer needs one.

Bad input (an empty prompt, a word that is not one token, a prompt longer than the context, a
layer or head out of range) raises a :class:`~sinklens.errors.SinklensError` that says what to do.

Example::

    circuit = explorer_circuit(model)
    tokens = circuit.prompt_tokens("repeat", word="the", n_repeats=300)
    original, patched = circuit.prompt_runs(tokens, layer=circuit.sink_layer + 1, patched=True)
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
from jaxtyping import Float, Int
from transformer_lens.model_bridge import TransformerBridge
from transformer_lens.utilities import get_act_name

from sinklens.analyses.norms import NormBaseline, sink_threshold
from sinklens.analyses.sink_neurons import NOTEBOOK_WORD
from sinklens.errors import SinklensError
from sinklens.load.fused_attention import key_weights
from sinklens.run.cache import as_index, check_layer, run_cache
from sinklens.run.interventions import Neuron, neuron_hook_name
from sinklens.run.sink_patch import SinkPatch, installed_patch, patch_for
from sinklens.run.tokens import (
    Token,
    check_context,
    default_words,
    repeated_tokens,
    text_tokens,
    token,
    word_token,
    words_to_tokens,
)
from sinklens.settings import Settings
from sinklens.studies.attack import ClusterAttack, sample_sequences
from sinklens.studies.setup import circuit_setup
from sinklens.studies.table import SinkTableRow

PROMPT_MODES = {"free text": "text", "word x repeats": "repeat", "cluster sequence": "cluster"}
# the longest repeat run or cluster sequence offered (or the context): one update within seconds
MAX_REPEATS = 2000
DEFAULT_REPEATS = 300
PATTERN_EDGE = 20  # a longer prompt's pattern is kept on its first and last PATTERN_EDGE positions
# forward passes remembered (prompt x patch state x layer), by the explorers of one circuit together
RUNS_KEPT = 8
ORIGINAL, PATCHED = "original", "patched"


@dataclass
class PromptRun:
    """What one forward pass of a prompt leaves for the views (original or patched)."""

    label: str
    token_texts: list[str]
    norms: Float[torch.Tensor, " pos"]  # ||blocks.L.hook_resid_post|| at the sink layer
    # the mean weight later queries pay the first token
    first_attention: Float[torch.Tensor, "layer head"]
    neurons: list[Neuron]
    activations: Float[torch.Tensor, "neuron pos"]  # blocks.L.mlp.hook_post of each neuron
    window: list[int]  # the positions the pattern view shows
    layer: int  # the layer whose pattern the run read
    # each of its heads' pattern on those positions
    pattern: Float[torch.Tensor, "head window window"]
    sinks: list[int]  # positions in the sink regime at the sink layer


def pattern_window(n_tokens: int, edge: int = PATTERN_EDGE) -> list[int]:
    """All positions of a short prompt; the first and last ``edge`` of a longer one (a 1000 x 1000
    pattern is too large to draw, and the sink and the end of a run are where the circuit shows)."""
    if n_tokens <= 2 * edge:
        return list(range(n_tokens))
    return [*range(edge), *range(n_tokens - edge, n_tokens)]


def run_prompt(
    model: TransformerBridge,
    tokens: Int[torch.Tensor, "1 pos"],
    *,
    sink_layer: int,
    neurons: Sequence[Neuron],
    layer: int,
    threshold: float,
    patch: SinkPatch | None = None,
) -> PromptRun:
    """Run ``tokens`` once (with ``patch`` installed for this run, if given) and keep what the
    explorer's views show: the sink-layer norms (and the positions at or above the sink regime's
    ``threshold``), the attention later queries pay the first token in every layer, the neurons'
    activations, and every head's pattern of ``layer`` on :func:`pattern_window`'s positions.

    Only ``layer`` runs attention step by step (its pattern is read); every other layer runs fused,
    and reports the weights paid to the first token from one more fused kernel on an indicator
    value (:func:`~sinklens.load.fused_attention.key_weights`), the numbers its pattern would give."""
    if installed_patch(model) is not None:  # the "original" run would be patched too
        raise SinklensError(
            "a sink patch is already installed on this model",
            "remove it (installed.remove()); the explorer installs its patch for its patched run",
        )
    norm_name = get_act_name("resid_post", check_layer(model, sink_layer))
    pattern_name = get_act_name("pattern", check_layer(model, layer))
    # every layer's attention is shown: run them all
    last = get_act_name("attn_out", model.cfg.n_layers - 1)
    neuron_layers = sorted({neuron_layer for neuron_layer, _ in neurons})
    window = pattern_window(tokens.shape[1])
    shown = torch.tensor(window)
    first_key = torch.tensor([0])

    def reduce(name: str, activation: torch.Tensor):
        if name == norm_name:
            return activation[0].float().norm(dim=-1).cpu()
        if name == pattern_name:  # the [head, query, key] pattern is never stored whole
            paid = activation[0, :, 1:, 0].float().mean(dim=-1).cpu()
            return paid, activation[0][:, shown][:, :, shown].float().cpu()
        if name == last:
            return activation[0, :1, :1]
        return activation[0].float().cpu()  # a layer's hook_post, [pos, d_mlp]

    names = [norm_name, pattern_name, last, *(neuron_hook_name(n) for n in neuron_layers)]
    installed = patch.installed(model) if patch is not None else nullcontext()
    fused = key_weights(model, lambda other: None if other == layer else first_key)
    with installed, fused as weights:
        cache = run_cache(model, tokens, names, reduce=reduce)
    paid, pattern = cache[pattern_name]
    first_attention = torch.stack(
        [
            paid if other == layer else weights.found[other][0, :, 1:, 0].mean(dim=-1).cpu()
            for other in range(model.cfg.n_layers)
        ]
    )
    activations = [
        cache[neuron_hook_name(neuron_layer)][:, index] for neuron_layer, index in neurons
    ]
    norms = cache[norm_name]
    return PromptRun(
        ORIGINAL if patch is None else PATCHED,
        [model.tokenizer.decode([int(t)]) for t in tokens[0]],
        norms,
        first_attention,
        list(neurons),
        torch.stack(activations) if activations else torch.zeros(0, tokens.shape[1]),
        window,
        layer,
        pattern,
        (norms >= threshold).nonzero().flatten().tolist(),
    )


def check_head(model: TransformerBridge, head: int) -> int:
    """Raise if ``head`` is not a 0-based head index of ``model``."""
    head = as_index(head, "head")
    n_heads = model.cfg.n_heads
    if not 0 <= head < n_heads:
        raise SinklensError(
            f"head {head} is out of range: {model.cfg.model_name} has heads 0..{n_heads - 1}",
            "pass a 0-based head index below n_heads",
        )
    return head


def check_opening(
    model: TransformerBridge, prompt_mode: str, layer: int | None, head: int
) -> tuple[int | None, int]:
    """Raise if the explorer cannot open on ``prompt_mode``, ``layer`` (None: the default) and
    ``head``."""
    if prompt_mode not in PROMPT_MODES.values():
        raise SinklensError(
            f"unknown prompt mode {prompt_mode!r}",
            f"pass one of {', '.join(repr(mode) for mode in PROMPT_MODES.values())}",
        )
    return (None if layer is None else check_layer(model, layer)), check_head(model, head)


def parse_tokens(model: TransformerBridge, entries: str) -> list[int]:
    """Token ids from comma-separated entries: a token id, or a word that is one token mid-text."""
    ids = [
        token(model, int(e)).id if e.lstrip("-").isdigit() else word_token(model, e).id
        for e in (part.strip() for part in entries.split(","))
        if e
    ]
    distinct = len(set(ids))
    if distinct < 2:
        raise SinklensError(
            f"the cluster has {distinct} distinct token(s); a sequence without repeats needs 2",
            "list at least two tokens, separated by commas (words or token ids)",
        )
    return ids


def token_entry(model: TransformerBridge, tok: Token) -> str:
    """How a token is typed in the explorer's word or cluster box: its word where that reads back
    as the same token, else its id."""
    try:
        return tok.text.strip() if word_token(model, tok.text.strip()).id == tok.id else str(tok.id)
    except SinklensError:
        return str(tok.id)


@dataclass(eq=False)
class ExplorerCircuit:
    """The circuit an explorer shows, measured once, and the forward passes of its prompts.

    ``first``, ``neurons`` and ``baseline`` (at the sink layer) do not depend on the prompt;
    ``patch`` is what a patched run installs (None: no sink neurons were found, nothing to patch).
    ``text`` and ``cluster`` are the natural text and the token pool that the free-text and
    cluster-sequence prompts open on. ``memory`` holds the last ``RUNS_KEPT`` runs, keyed by
    prompt, patch state and the layer whose pattern was read; every explorer of this circuit
    shares them. Build one with :func:`explorer_circuit`.
    """

    model: TransformerBridge
    first: Token
    neurons: list[Neuron]
    baseline: NormBaseline
    patch: SinkPatch | None
    text: str
    cluster: list[Token]
    memory: OrderedDict[tuple[tuple[int, ...], bool, int], PromptRun] = field(
        default_factory=OrderedDict, repr=False
    )

    @property
    def sink_layer(self) -> int:
        """The layer whose norms the views show (where the first token's norm is reached)."""
        return self.baseline.layer

    @property
    def cluster_entries(self) -> str:
        """The cluster as it is typed: words or token ids, comma-separated."""
        return ", ".join(token_entry(self.model, t) for t in self.cluster)

    def prompt_tokens(
        self,
        prompt_mode: str,
        *,
        text: str | None = None,
        word: str | int = NOTEBOOK_WORD,
        n_repeats: int = DEFAULT_REPEATS,
        cluster: str | None = None,
        length: int = DEFAULT_REPEATS,
        seed: int = 0,
    ) -> Int[torch.Tensor, "1 pos"]:
        """``[first] + prompt`` for ``prompt_mode``, from that mode's inputs only (a bad prompt
        raises): "text" tokenizes ``text`` (default: the natural text); "repeat" repeats ``word`` (a
        word, or a token id, also typed as text) ``n_repeats`` times; "cluster" draws ``length``
        tokens with ``seed`` from ``cluster`` (comma-separated words or token ids; default: the
        circuit's cluster), never the same token twice in a row."""
        first = self.first.id
        if prompt_mode == "text":
            text = self.text if text is None else text
            if not text.strip():
                raise SinklensError(
                    "the prompt is empty", "type some text, or pick a word and a repeat count"
                )
            return text_tokens(self.model, text, first=first)
        if prompt_mode == "repeat":
            if isinstance(word, str) and word.strip().lstrip("-").isdigit():
                word = int(word)  # a token id; a word's own checks name its problem
            return repeated_tokens(self.model, word, n_repeats, first=first)
        pool = parse_tokens(self.model, self.cluster_entries if cluster is None else cluster)
        check_context(self.model, length + 1)
        sequence = sample_sequences(pool, 1, length, seed=seed)
        return torch.cat([torch.tensor([[first]]), sequence], dim=1)

    def prompt_runs(
        self, tokens: Int[torch.Tensor, "1 pos"], layer: int, patched: bool = False
    ) -> list[PromptRun]:
        """The prompt's original run, and its patched run if ``patched``, each reading ``layer``'s
        pattern: from memory where a run of the same prompt, patch state and layer was kept."""
        runs = [self._run(tokens, False, layer)]
        if patched:
            runs.append(self._run(tokens, True, layer))
        return runs

    def _run(self, tokens: Int[torch.Tensor, "1 pos"], patched: bool, layer: int) -> PromptRun:
        key = (tuple(tokens[0].tolist()), patched, layer)
        if key in self.memory:
            self.memory.move_to_end(key)
            return self.memory[key]
        # the sink neurons, and any other neuron the patch clamps
        extra = [n for n in (self.patch.neurons if self.patch else ()) if n not in self.neurons]
        run = run_prompt(
            self.model,
            tokens,
            sink_layer=self.sink_layer,
            neurons=[*self.neurons, *extra],
            layer=layer,
            threshold=sink_threshold(self.baseline.first_token_norm, self.baseline.typical_norm),
            patch=self.patch if patched else None,
        )
        self.memory[key] = run
        if len(self.memory) > RUNS_KEPT:
            self.memory.popitem(last=False)
        return run


def explorer_circuit(
    model: TransformerBridge,
    row: SinkTableRow | None = None,
    *,
    settings: Settings | None = None,
    text: str | None = None,
    patch: SinkPatch | None = None,
    cluster: ClusterAttack | Sequence[int | str] | None = None,
    n_repeats: int = DEFAULT_REPEATS,
) -> ExplorerCircuit:
    """The circuit an explorer shows, as :func:`sinklens.explore` takes its arguments.

    The first token, the sink layer and neurons and the typical norm come from ``row`` (a
    :func:`~sinklens.studies.table.sink_table_row` result) or are measured now on ``text``
    (default: the settings' corpus, the first 1000 characters of Tiny Shakespeare as the paper's)
    by :func:`~sinklens.studies.setup.circuit_setup` with ``settings`` (default: the defaults,
    with ``n_repeats``), as every study measures them. ``patch`` is what a patched run installs
    (default: the paper's Listing 1 on the sink neurons; checked against the model). ``cluster``
    is the cluster sequences' pool: a :class:`ClusterAttack`'s cluster, or token ids or one-token
    words (default: the tokens of "Another one bites the dust")."""
    settings = Settings.of(settings, n_repeats=n_repeats)
    natural = settings.natural_text() if text is None else text
    setup = row.setup if row is not None else circuit_setup(model, natural, settings)
    neurons = setup.sink_neurons
    if patch is None and neurons:
        patch = patch_for(model, neurons)
    elif patch is not None:
        patch.check(model.cfg.n_layers, model.cfg.d_mlp, model.cfg.model_name)
    if isinstance(cluster, ClusterAttack):
        cluster = cluster.cluster
    pool = default_words(model) if cluster is None else words_to_tokens(model, cluster)
    return ExplorerCircuit(model, setup.first, neurons, setup.baseline, patch, natural, pool)
