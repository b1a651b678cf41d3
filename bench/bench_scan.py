"""Benchmark: vocabulary-scan throughput (tokens scanned per second), three ways, in one run.

* **sinklens**: :func:`sinklens.studies.scan.scan_rows`, batched, the forward stopped after the sink
  layer, each hook reduced as it fires (norms, a few neurons);
* **naive**: one full-model ``run_with_cache`` per token, everything cached, the same numbers read
  from the cache afterwards (what a first notebook would do);
* **plain HF**: the same batches through the Hugging Face model (default attention: SDPA) cut after
  the sink layer, norms read by a forward hook: the floor any tool on this model pays;
* **eager**: sinklens with the fused attention path switched off, as it ran before it existed.

Each side runs in its own process, alternating. Targets: at least 5x the naive loop, at least 1.0x
plain HF. The last line is one JSON object with the ratios and targets. ``--batch-sizes`` measures
sinklens at several batch sizes first and uses the fastest (the scan's CPU default, ``SCAN_BATCH_CPU`` in
:mod:`sinklens.load.sources`, is set from this measurement).

Usage: ``python bench/bench_scan.py [--tokens N] [--n-repeats N] [--trials N] [--batch-sizes 1,4,8,16]``
(on the default model; the scan's setup is measured once and kept in ``--setup``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
from pathlib import Path

from _harness import alternate, print_summary, run_worker

TARGETS = {"naive": ">= 5", "hf": ">= 1.0", "eager": "> 1 (the fused path is faster)"}

WORKER = r"""
mode, model_name, n_tokens, n_repeats, batch, rounds = sys.argv[1:7]
n_tokens, n_repeats, batch, rounds = int(n_tokens), int(n_repeats), int(batch), int(rounds)
device = "cuda" if torch.cuda.is_available() else "cpu"
from sinklens.studies.scan import ScanSetup, repeated_batch, scan_rows

import sinklens
from sinklens.load.models import load_hf_model
setup = ScanSetup.from_json(json.load(open(model_name)))
if mode == "hf":
    hf, _ = load_hf_model(device=device)  # default attention: SDPA
else:
    model = sinklens.load_model(device=device)
if mode == "eager":  # sinklens as it ran before the fused attention path: the "before" of the comparison
    from sinklens.load.fused_attention import use_fused_attention
    use_fused_attention(model, False)
tokens = list(range(1000, 1000 + n_tokens))

def batches(size):
    for i in range(0, len(tokens), size):
        ids = torch.tensor(tokens[i : i + size])
        yield ids, repeated_batch(setup, ids[:, None].expand(-1, setup.n_repeats))

if mode in ("sinklens", "eager"):
    def run():
        return sum(r["peak_ratio"] for i in range(0, len(tokens), batch) for r in scan_rows(model, setup, tokens[i : i + batch]))
elif mode == "naive":
    def run():
        total = 0.0
        for ids, seq in batches(1):
            _, cache = model.run_with_cache(seq.to(device))
            total += float(cache[f"blocks.{setup.layer}.hook_resid_post"][0, 1:].norm(dim=-1).max()) / setup.typical_norm
            _ = cache["blocks.0.hook_resid_post"][0, -1], [cache[f"blocks.{l}.mlp.hook_post"][0, 1:, n] for l, n in setup.sink_neurons]
            _ = cache[f"blocks.{setup.detector[0]}.mlp.hook_pre"][0, -1, setup.detector[1]]
            model.run_with_cache(ids[:, None].to(device))
        return total
else:  # plain HF, cut after the sink layer, norms read by a hook
    hf.model.layers = hf.model.layers[: setup.layer + 1]
    seen = {}
    hf.model.layers[setup.layer].register_forward_hook(lambda m, a, out: seen.__setitem__("h", out[0] if isinstance(out, tuple) else out))
    def run():
        total = 0.0
        for ids, seq in batches(batch):
            hf.model(input_ids=seq.to(device))
            total += float((seen["h"][:, 1:].float().norm(dim=-1).max(dim=-1).values / setup.typical_norm).sum())
            hf.model(input_ids=ids[:, None].to(device))
        return total

result = measure(run, rounds)
result["tokens_per_second"] = len(tokens) / result["seconds"]
print(json.dumps(result))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--setup", default="scan-setup.json", help="a scan.json (written from smollm2 if missing)"
    )
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--n-repeats", type=int, default=1000)
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--batch-sizes", default="1,4,8,16")
    parser.add_argument("--sides", default="sinklens,naive,hf,eager")
    args = parser.parse_args()
    if not os.path.exists(args.setup):
        from sinklens import load_model
        from sinklens._io import write_json
        from sinklens.load.corpus import shakespeare
        from sinklens.studies.scan import scan_setup

        write_json(
            Path(args.setup),
            scan_setup(load_model(), shakespeare(), n_repeats=args.n_repeats).to_json(),
        )
    setup = json.loads(Path(args.setup).read_text())
    if setup["n_repeats"] != args.n_repeats:  # the sink regime does not depend on it; the cost does
        Path(args.setup).write_text(json.dumps({**setup, "n_repeats": args.n_repeats}))
    source = args.setup
    sides = args.sides.split(",")
    common = (source, args.tokens, args.n_repeats)
    speeds: dict[int, float] = {}
    for size in map(int, args.batch_sizes.split(",")):
        if "sinklens" in sides:
            speeds[size] = run_worker(WORKER, "sinklens", *common, size, args.rounds)[
                "tokens_per_second"
            ]
            print(f"sinklens, batch {size}: {speeds[size]:.2f} tokens/s")
    best = max(speeds, key=speeds.__getitem__) if speeds else int(args.batch_sizes.split(",")[-1])
    print(
        f"SmolLM2, {args.tokens} tokens x {args.n_repeats} repeats; sinklens batch size {best} (fastest)"
    )
    ratios = {}
    for other in ("naive", "hf", "eager"):
        if other not in sides or "sinklens" not in sides:
            continue
        size = 1 if other == "naive" else best
        pairs = alternate(
            WORKER,
            ("sinklens", *common, best, args.rounds),
            (other, *common, size, args.rounds),
            args.trials,
        )
        speed = [ours["tokens_per_second"] / theirs["tokens_per_second"] for ours, theirs in pairs]
        print(
            f"  vs {other}: tokens/s {statistics.median(p[0]['tokens_per_second'] for p in pairs):.2f} vs "
            f"{statistics.median(p[1]['tokens_per_second'] for p in pairs):.2f}; speed ratio median "
            f"{statistics.median(speed):.2f}x (range {min(speed):.2f}-{max(speed):.2f}; target {TARGETS[other]})"
        )
        ratios[f"speed_vs_{other}"] = round(statistics.median(speed), 3)
        ratios[f"speed_vs_{other}_range"] = [round(min(speed), 3), round(max(speed), 3)]
    print_summary(
        "scan",
        tokens=args.tokens,
        n_repeats=args.n_repeats,
        batch_size=best,
        tokens_per_second={str(k): round(v, 3) for k, v in speeds.items()},
        **ratios,
        targets={f"speed_vs_{k}": v for k, v in TARGETS.items()},
    )


if __name__ == "__main__":
    main()
