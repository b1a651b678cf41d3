"""The live explorer and the sink census against a plain Hugging Face forward pass of the same tokens.

    python bench/bench_explore.py [--rounds 3]

On the default model: the explorer (``sl.explore``) is built on ``' the'`` x 1000, then each round moves it to a
new 1,001-token prompt with the patch off (the word box: ``' dust'``, then ``' the'`` again, each a forward pass
since memory holds a few runs only: the runs are cleared first) and reads ``last_update_seconds``; beside it, in
the same process and round, the same tokens go through a plain Hugging Face model in SDPA (``load_hf_model``, a
separate copy, the whole model to the logits). The census (``find_sinks``, the circuit setup given) of the first
1,000 tokens of the natural text is timed against the plain forward of those tokens the same way. Also printed:
moving the head (from memory) and the layer (one forward pass). Ratios are medians over the rounds; the last line
is one JSON object with ``update_ratio`` (target <= 1.2) and ``census_ratio`` (target <= 2).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sinklens as sl
from _harness import print_summary
from sinklens.present.explore import explore
from sinklens.studies.census import find_sinks


def _plain_seconds(hf_model, tokens: torch.Tensor) -> float:
    with torch.inference_mode():
        start = time.perf_counter()
        hf_model(tokens)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    model = sl.load_model()
    hf_model, _ = sl.load_hf_model()
    explorer = explore(model, word="the", n_repeats=1000)
    setup = sl.circuit_setup(model)
    text = sl.text_tokens(
        model, sl.corpus.shakespeare()[:8000], first=setup.first.id, max_tokens=1000
    )
    _plain_seconds(hf_model, text)  # warm-up
    updates, census, plain_prompt, plain_text, head, layer = [], [], [], [], [], []
    for _ in range(args.rounds):
        for word in ("dust", "the"):
            explorer.circuit.memory.clear()
            explorer.word.value = word
            if explorer.error is not None:
                raise explorer.error
            updates.append(explorer.last_update_seconds)
            plain_prompt.append(_plain_seconds(hf_model, explorer.prompt_tokens()))
        explorer.head.value = (explorer.head.value + 1) % model.cfg.n_heads
        head.append(explorer.last_update_seconds)
        explorer.layer.value = (explorer.layer.value + 1) % model.cfg.n_layers
        layer.append(explorer.last_update_seconds)
        start = time.perf_counter()
        find_sinks(model, text, setup=setup)
        census.append(time.perf_counter() - start)
        plain_text.append(_plain_seconds(hf_model, text))
    update_ratios = [u / p for u, p in zip(updates, plain_prompt)]
    census_ratios = [c / p for c, p in zip(census, plain_text)]
    median = statistics.median
    print(
        f"new 1,001-token prompt, patch off: median {median(updates):.2f} s; plain HF SDPA forward "
        f"{median(plain_prompt):.2f} s; ratio {median(update_ratios):.2f}x (range {min(update_ratios):.2f}-"
        f"{max(update_ratios):.2f}; target <= 1.2x)"
    )
    print(
        f"census of 1,000 tokens of natural text: median {median(census):.2f} s; plain forward {median(plain_text):.2f}"
        f" s; ratio {median(census_ratios):.2f}x (range {min(census_ratios):.2f}-{max(census_ratios):.2f}; target <= 2x)"
    )
    print(
        f"moving the head (from memory): {median(head):.3f} s; moving the layer (a forward pass): {median(layer):.2f} s"
    )
    print_summary(
        "explore",
        update_ratio=round(median(update_ratios), 3),
        census_ratio=round(median(census_ratios), 3),
        update_seconds=round(median(updates), 3),
        plain_seconds=round(median(plain_prompt), 3),
        census_seconds=round(median(census), 3),
        head_seconds=round(median(head), 3),
        layer_seconds=round(median(layer), 3),
        targets={"update_ratio": "<= 1.2", "census_ratio": "<= 2"},
    )


if __name__ == "__main__":
    main()
