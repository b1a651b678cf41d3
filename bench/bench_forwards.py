"""Benchmark: ``sinklens circuit`` and ``sinklens report`` against plain Hugging Face forwards of the same batches.

The sinklens side runs the analysis on the default model (warm cache) and records every forward pass
the bridge makes: its batch and length, how many positions of keys and values it continues (a shared
prefix), and how many blocks it really runs (read by hooks on the blocks: ``stop_at_layer`` ends a
pass early). A pass that runs every block is replayed with the logits, as the bridge computes them. The plain side replays exactly those passes
on the Hugging Face model with its default attention (SDPA), cut after the same block, with a cache
of the same length standing in for the prefix, and does no analysis. Both run in alternating
subprocesses. The plain side also times one forward of a 1,001-token sequence through the whole
model, the unit of the report's budget.

Targets: the analysis at most 1.2x its replayed forwards; the report at most 50 times one 1,001-token
forward. The last line is one JSON object with the ratios and targets.

Usage: ``python bench/bench_forwards.py [--what circuit|report|both] [--trials N]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from _harness import print_summary, run_worker

WORKER = r"""
mode, what, record = sys.argv[1], sys.argv[2], sys.argv[3]
if mode == "sinklens":
    import shutil, tempfile
    import sinklens
    from transformer_lens.model_bridge import TransformerBridge
    model = sinklens.load_model()
    calls, forward, ran = [], TransformerBridge.forward, set()
    for i, block in enumerate(model.blocks):  # the blocks a pass really runs (stop_at_layer aborts it early)
        block.register_forward_hook(lambda module, args, output, i=i: ran.add(i))
    def recording(self, input, *args, **kwargs):
        past = kwargs.get("past_key_values")
        ran.clear()
        try:
            return forward(self, input, *args, **kwargs)
        finally:
            calls.append([*map(int, input.shape), int(past.get_seq_length()) if past is not None else 0,
                          max(ran, default=-1) + 1])
    TransformerBridge.forward = recording
    def run():
        calls.clear()
        if what == "circuit":
            return sinklens.first_layer_circuit(model, sinklens.corpus.shakespeare()).lone_metric
        out = tempfile.mkdtemp()
        try:
            return sinklens.run_report(sinklens.ReportConfig(), out, model=model)["first_token_norm"]
        finally:
            shutil.rmtree(out)
    result = measure(run, 1)
    json.dump(calls, open(record, "w"))
    result["forwards"] = len(calls)
    print(json.dumps(result))
    sys.exit()

from transformers import AutoModelForCausalLM, DynamicCache
from sinklens.load.models import alias_weights
from sinklens.load.registry import DEFAULT_MODEL
hf = AutoModelForCausalLM.from_pretrained(alias_weights(DEFAULT_MODEL), dtype=torch.float32).eval()  # default: SDPA
blocks, calls = hf.model.layers, json.load(open(record))
n_kv, d_head = hf.config.num_key_value_heads, hf.config.hidden_size // hf.config.num_attention_heads
generator = torch.Generator().manual_seed(0)

def replay(batch, length, past, depth):
    ids = torch.randint(100, hf.config.vocab_size, (batch, length), generator=generator)
    cache = None
    if past:
        cache = DynamicCache(config=hf.config)
        for layer in range(depth):
            cache.update(torch.randn(batch, n_kv, past, d_head), torch.randn(batch, n_kv, past, d_head), layer)
    if depth >= len(blocks):
        return hf(ids, past_key_values=cache).logits[0, -1, 0]
    hf.model.layers = blocks[:depth]
    try:
        return hf.model(ids, past_key_values=cache).last_hidden_state[0, -1, 0]
    finally:
        hf.model.layers = blocks

result = measure(lambda: sum(float(replay(*call)) for call in calls), 1)
whole = torch.randint(100, hf.config.vocab_size, (1, 1001), generator=generator)
result["one_forward_1001"] = measure(lambda: hf(whole).logits[0, -1, 0], 3)["seconds"]
print(json.dumps(result))
"""

TARGET_REPLAY, TARGET_REPORT_FORWARDS = 1.2, 50


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--what", choices=("circuit", "report", "both"), default="both")
    parser.add_argument(
        "--trials", type=int, default=2, help="alternating process pairs (default: %(default)s)"
    )
    args = parser.parse_args()
    results = {}
    for what in ("circuit", "report") if args.what == "both" else (args.what,):
        pairs = []
        with tempfile.TemporaryDirectory() as tmp:
            record = os.path.join(tmp, "forwards.json")
            for _ in range(args.trials):
                ours = run_worker(WORKER, "sinklens", what, record)
                pairs.append((ours, run_worker(WORKER, "hf", what, record)))
        ratios = [ours["seconds"] / plain["seconds"] for ours, plain in pairs]
        seconds = statistics.median(ours["seconds"] for ours, _ in pairs)
        replayed = statistics.median(plain["seconds"] for _, plain in pairs)
        unit = statistics.median(plain["one_forward_1001"] for _, plain in pairs)
        print(
            f"{what} on the default model ({args.trials} alternating process pairs): sinklens {seconds:.1f} s, "
            f"{pairs[0][0]['forwards']} forward passes; the same passes on plain HF (SDPA) {replayed:.1f} s: ratio "
            f"median {statistics.median(ratios):.2f}x (range {min(ratios):.2f}-{max(ratios):.2f}; target <= "
            f"{TARGET_REPLAY}x); one 1,001-token forward of the whole model {unit:.2f} s, so {what} = "
            f"{seconds / unit:.0f} of them"
        )
        results[what] = {
            "seconds": round(seconds, 1),
            "forwards": pairs[0][0]["forwards"],
            "replayed_seconds": round(replayed, 1),
            "ratio_to_replay": round(statistics.median(ratios), 3),
            "ratio_to_replay_range": [round(min(ratios), 3), round(max(ratios), 3)],
            "one_forward_1001_seconds": round(unit, 3),
            "in_1001_token_forwards": round(seconds / unit, 1),
        }
    targets = {
        "ratio_to_replay": f"<= {TARGET_REPLAY}",
        "report.in_1001_token_forwards": f"<= {TARGET_REPORT_FORWARDS}",
    }
    print_summary("forwards", **results, targets=targets)


if __name__ == "__main__":
    main()
