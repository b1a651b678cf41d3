"""Benchmark: the Table-1 row (``sink_table_row``) against plain Hugging Face forwards of the same tokens.

``sinklens table`` chooses the first token, finds the sink layer and neurons, and measures the word
list's norm curves intact and ablated. The plain side replays exactly the forward passes that needs
(the same token batches, each cut after the same layer, the same activations read and the same
neurons ablated) on a plain HF model with its default attention (SDPA) and forward hooks, and does
no analysis. Both run in alternating subprocesses; the ratio of their times is the cost of sinklens'
bridge, hooks and analysis on top of the forwards it cannot avoid. Target: at most 1.0x. The last
line is one JSON object with the ratio and its target.

Usage: ``python bench/bench_table.py [--repeats N] [--trials N] [--rounds N]``.
"""

from __future__ import annotations

import argparse

from _harness import alternate, print_pairs, print_summary

WORKER = r"""
mode, n_repeats, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
import sinklens
from sinklens.load.corpus import shakespeare
model = sinklens.load_model()
text = shakespeare()[:1000]

def checksum(row):
    return sum(row.curves.max_norms) + sum(row.curves_ablated.max_norms) + row.neurons.first_token_norm_ablated

if mode == "sinklens":
    print(json.dumps(measure(lambda: checksum(sinklens.sink_table_row(model, text, n_repeats=n_repeats)), rounds)))
    sys.exit()

# The forward passes of one row, taken from a row computed once (untimed), replayed on plain HF.
from transformers import AutoModelForCausalLM
from sinklens.load.models import alias_weights
from sinklens.load.registry import DEFAULT_MODEL
from sinklens.run.tokens import encode

row = sinklens.sink_table_row(model, text, n_repeats=n_repeats)
first, layer, neurons = row.choice.token.id, row.neurons.sink_layer, row.neurons
text_ids = encode(model, text)[:512]
candidates = torch.tensor([[c.id, *text_ids[1:]] for c in row.choice.candidates])
reference = sinklens.text_tokens(model, text, first=first)
notebook = sinklens.repeated_tokens(model, "the", n_repeats, first=first)
lone = torch.full((2 * len(neurons.candidates) + 1, 1), first)
filter_rows = [neurons.candidates[:k] for k in range(len(neurons.candidates) + 1)] + [[c] for c in neurons.candidates]
words = [sinklens.repeated_tokens(model, w.id, n_repeats, first=first) for w in row.curves.words]
search_depth = min(15, model.cfg.n_layers)
del model, row

hf = AutoModelForCausalLM.from_pretrained(alias_weights(DEFAULT_MODEL), dtype=torch.float32).eval()  # default: SDPA
blocks = hf.model.layers

def masks(rows):
    keep = torch.ones(len(rows), 1, hf.config.intermediate_size)
    for b, r in enumerate(rows):
        keep[b, 0, [n for _, n in r]] = 0.0
    return keep

def forward(ids, depth, resid=(), mlp_out=(), post=None, gate=None, ablate=None):
    hf.model.layers = blocks[:depth]
    seen, handles = [], []
    out = lambda o: o[0] if isinstance(o, tuple) else o
    for l in resid:
        handles.append(blocks[l].register_forward_hook(lambda m, i, o: seen.append(out(o).norm(dim=-1))))
    for l in mlp_out:
        handles.append(blocks[l].mlp.register_forward_hook(lambda m, i, o: seen.append(o.norm(dim=-1))))
    if ablate is not None:
        keep = masks(ablate)
        handles.append(blocks[layer].mlp.down_proj.register_forward_pre_hook(lambda m, args: (args[0] * keep,)))
    if post is not None:
        handles.append(blocks[post].mlp.down_proj.register_forward_pre_hook(lambda m, args: seen.append(args[0])))
    if gate is not None:
        handles.append(blocks[gate].mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(o)))
    try:
        hf.model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
        hf.model.layers = blocks
    return seen

def run():
    forward(candidates, search_depth, resid=range(search_depth))
    forward(reference, search_depth, mlp_out=range(search_depth))
    forward(reference, layer + 1, resid=[layer], post=layer)
    forward(notebook, layer + 1, gate=layer)
    ablated_first = forward(lone, layer + 1, resid=[layer], ablate=filter_rows)[0][len(neurons.sink_neurons), 0]
    forward(reference, layer + 1, resid=[layer])
    intact = [forward(w, layer + 1, resid=[layer])[0][0, 1:].max() for w in words]
    ablated = [forward(w, layer + 1, resid=[layer], ablate=[neurons.sink_neurons])[0][0, 1:].max() for w in words]
    return sum(intact) + sum(ablated) + ablated_first

print(json.dumps(measure(run, rounds)))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--repeats", type=int, default=1000, help="repeats per word (default: %(default)s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="timed rounds per process, best kept (default: %(default)s)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=3,
        help="process pairs, alternating; medians reported (default: %(default)s)",
    )
    args = parser.parse_args()
    pairs = alternate(
        WORKER,
        ("sinklens", args.repeats, args.rounds),
        ("hf", args.repeats, args.rounds),
        args.trials,
    )
    row = print_pairs(
        f"Table-1 row of the default model, 5 words x {args.repeats} repeats ({args.trials} alternating "
        f"process pairs, best of {args.rounds} rounds each):",
        pairs,
        {"seconds": 1.0},
    )
    print_summary("table", table_row=row)


if __name__ == "__main__":
    main()
