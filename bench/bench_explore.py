"""Benchmark: seconds per update of the live explorer (``sl.explore``) on the default model.

Builds the explorer on ``' the'`` x 1000 (the first token, sink layer and neurons and typical
norm are measured then), then drives it as a user does and records ``last_update_seconds`` for
each change: a new prompt (the repeat slider, the word; one forward pass that reads every layer's
attention pattern), a layer and a head move (redrawn from memory), the patch turned on (its own
forward pass), off and on again (from memory), and the slider moved with the patch on (two forward
passes). For scale it times a plain Hugging Face forward pass of the same 1001 tokens (the model's
default attention, best of 2) under the same load. Prints one JSON object on its last line.

Usage: ``python bench/bench_explore.py``.
"""

from __future__ import annotations

import json
import time

import torch

import sinklens as sl
from sinklens.present.explore import explore


def main() -> None:
    model = sl.load_model()
    start = time.perf_counter()
    explorer = explore(model, word="the", n_repeats=1000)
    seconds = {"build (measures the circuit, then ' the' x 1000)": time.perf_counter() - start,
               "' the' x 1000": explorer.last_update_seconds}
    steps = [
        ("' the' x 300", explorer.repeats, 300),
        ("' dust' x 300", explorer.word, "dust"),
        ("' dust' x 1000", explorer.repeats, 1000),
        ("layer move", explorer.layer, explorer.layer.value + 1),
        ("head move", explorer.head, explorer.head.value + 1),
        ("patch on, ' dust' x 1000 (its run only)", explorer.patch_toggle, True),
        ("patch off (from memory)", explorer.patch_toggle, False),
        ("patch on again (from memory)", explorer.patch_toggle, True),
        ("' dust' x 500, patch on (two runs)", explorer.repeats, 500),
    ]
    for name, control, value in steps:
        control.value = value
        if explorer.error is not None:
            raise explorer.error
        seconds[name] = explorer.last_update_seconds
    tokens = sl.repeated_tokens(model, "the", 1000, first=explorer.first.id)
    plain = []
    with torch.inference_mode():
        for _ in range(2):
            begin = time.perf_counter()
            model.original_model(tokens)
            plain.append(time.perf_counter() - begin)
    seconds["plain HF forward, 1001 tokens"] = min(plain)
    for name, value in seconds.items():
        print(f"{name:50s} {value:6.2f} s")
    print(json.dumps({"model": model.cfg.model_name, "seconds": {k: round(v, 3) for k, v in seconds.items()}}))


if __name__ == "__main__":
    main()
