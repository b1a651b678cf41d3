"""Benchmark: generation with the sink-neuron patch against generation without it.

Greedy generation of ``--new-tokens`` tokens after a prompt of ``--prompt`` tokens, KV cache on,
on the plain Hugging Face model (the patch as forward hooks) and on the TransformerBridge (the
patch as hook-point hooks), each side in its own process, the sides alternating. Prints the
time and peak-memory ratios, patched over unpatched; target: patched throughput at least 0.97x
unpatched, i.e. a time ratio of at most 1.03.

``--model smollm2`` (default) uses the real default model and the patch ``sinklens patch`` finds
(computed once, untimed); ``--model random-1b`` builds a randomly initialised Llama of
Llama-3.2-1B's shape (1.2B parameters; for a GPU machine, where no weights can be brought) and
clamps two neurons of layer 1 chosen here: for speed only which hook runs matters, not which neuron.

Usage: ``python bench/bench_patch.py [--model smollm2|random-1b] [--trials N] [--new-tokens N]
[--prompt N] [--batch N] [--paths hf,bridge]``.
"""

from __future__ import annotations

import argparse

from _harness import alternate, print_pairs, print_summary

WORKER = r"""
path, condition, model_name, prompt, new_tokens, batch, rounds = sys.argv[1:8]
prompt, new_tokens, batch, rounds = int(prompt), int(new_tokens), int(batch), int(rounds)
device = "cuda" if torch.cuda.is_available() else "cpu"
from sinklens.run.sink_patch import SinkPatch, patch_for

if model_name == "random-1b":
    from transformers import LlamaConfig, LlamaForCausalLM
    config = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device, torch.bfloat16 if device == "cuda" else torch.float32).eval()
    patch = patch_for(model, [(1, 0), (1, 1)], hook="up")
    vocab = config.vocab_size
else:
    from sinklens.load.models import load_hf_model, load_model
    if path == "bridge":
        model = load_model(device=device)
    else:
        model, _ = load_hf_model(device=device)
    patch = SinkPatch.load(model_name)
    vocab = 49152
torch.manual_seed(1)
ids = torch.randint(100, vocab - 100, (batch, prompt), device=device)
if condition == "patched":
    patch.install(model)

def run():
    if path == "bridge":
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, stop_at_eos=False, verbose=False,
                             use_past_kv_cache=True)
    else:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    if device == "cuda":
        torch.cuda.synchronize()
    return out.shape[1]

result = measure(run, rounds)
result["tokens_per_second"] = batch * new_tokens / result["seconds"]
if device == "cuda":
    result["gpu"] = torch.cuda.get_device_name()
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "random-1b"))
    parser.add_argument(
        "--patch", default="patch.json", help="the patch file for smollm2 (written if missing)"
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--paths", default="hf,bridge")
    args = parser.parse_args()
    source = args.model
    if args.model == "smollm2":
        import os
        import subprocess
        import sys

        if not os.path.exists(args.patch):
            subprocess.run(
                [sys.executable, "-m", "sinklens", "patch", "--out", args.patch], check=True
            )
        source = args.patch
    results = {}
    for path in args.paths.split(","):
        if path == "bridge" and args.model != "smollm2":
            continue  # the bridge boots from a sinklens model spec
        common = (source, args.prompt, args.new_tokens, args.batch, args.rounds)
        pairs = alternate(
            WORKER, (path, "patched", *common), (path, "unpatched", *common), args.trials
        )
        results[path] = print_pairs(
            f"{args.model}, {path} path: greedy generation of {args.new_tokens} tokens after {args.prompt}, "
            f"batch {args.batch}",
            pairs,
            {"seconds": 1.03, "peak_bytes": 1.1},
            names=("patched", "unpatched"),
            same_results=False,
        )
        speeds = [(ours["tokens_per_second"], plain["tokens_per_second"]) for ours, plain in pairs]
        print(
            "  tokens/s patched vs unpatched: " + ", ".join(f"{a:.1f} / {b:.1f}" for a, b in speeds)
        )
        if "gpu" in pairs[0][0]:
            print(f"  device: {pairs[0][0]['gpu']}")
    print_summary("patch", model=args.model, **results)


if __name__ == "__main__":
    main()
