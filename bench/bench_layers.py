"""Layers on demand at the paper's scale: a Table-1 row of a randomly initialised checkpoint of Llama-2-7B's
shape (bfloat16, sharded safetensors), built with only the layers the row reads against the whole model,
in bfloat16 and in float32 (a conversion). Peak resident memory and time, side by side in one run.

    python bench/bench_layers.py [--max-layer 4] [--dir DIR]

The checkpoint (about 14 GB) is written once to DIR (default: the sinklens cache, ``bench/llama-2-7b-shape``),
never to the repository. Its weights are random, so the model has no sink: the row ends with the line
saying so, which is the answer for such a model. Its tokenizer is the default model's (49,152 tokens;
Llama-2's has 32,000, so the embeddings are 0.4 GB larger than Llama-2-7B's). Each side runs in its
own process; memory is that process' peak resident set (VmHWM). The float32 whole model (27 GB) does not
fit a 24 GB machine and is skipped when it would not fit.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

from _harness import print_summary, run_worker

SHAPE: dict[str, Any] = dict(  # LlamaConfig keyword arguments
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
SHARD_BYTES = 2 * 1024**3

WORKER = r"""
import os, sys, time
from sinklens.errors import SinklensError
from sinklens.settings import Settings
from sinklens.studies.table import sink_table_row
directory, dtype, max_layer, early = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4] == "early"
start = time.perf_counter()
config = Settings(model=directory, dtype=dtype, max_layer=max_layer, words=["the"], n_repeats=100)
try:
    sink_table_row(config.load_model(early_layers_only=early), config.natural_text(), config)
    outcome = "a row"
except SinklensError as exc:
    outcome = str(exc).split(". Fix:")[0]
print(json.dumps({"seconds": time.perf_counter() - start, "peak_bytes": _rss("VmHWM"), "outcome": outcome}))
"""


def build_checkpoint(directory: Path) -> None:
    """Random Llama-2-7B-shaped weights in bfloat16, written shard by shard (never all in memory)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from sinklens.load.models import alias_weights

    if (directory / "model.safetensors.index.json").is_file():
        return
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(alias_weights("smollm2-135m-instruct"))
    config = LlamaConfig(
        **SHAPE,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # a legacy keyword that transformers' dataclass configs take at run time, unlike their stubs
        torch_dtype="bfloat16",  # type: ignore[call-arg]
        architectures=["LlamaForCausalLM"],
    )
    d, f, v = SHAPE["hidden_size"], SHAPE["intermediate_size"], len(tokenizer)
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, d)}
    for layer in range(SHAPE["num_hidden_layers"]):
        prefix = f"model.layers.{layer}."
        shapes |= {prefix + f"self_attn.{p}_proj.weight": (d, d) for p in "qkvo"}
        shapes |= {
            prefix + "mlp.gate_proj.weight": (f, d),
            prefix + "mlp.up_proj.weight": (f, d),
            prefix + "mlp.down_proj.weight": (d, f),
            prefix + "input_layernorm.weight": (d,),
            prefix + "post_attention_layernorm.weight": (d,),
        }
    shapes |= {"model.norm.weight": (d,), "lm_head.weight": (v, d)}
    generator = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    size, index = 0, 1
    names = list(shapes)
    for i, name in enumerate(names):
        shape = shapes[name]
        shard[name] = (
            torch.ones(shape, dtype=torch.bfloat16)
            if len(shape) == 1
            else (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
        )
        size += shard[name].numel() * 2
        if size >= SHARD_BYTES or i == len(names) - 1:
            filename = f"model-{index:05d}.safetensors"
            save_file(shard, directory / filename, metadata={"format": "pt"})
            weight_map |= {key: filename for key in shard}
            shard, size, index = {}, 0, index + 1
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def bytes_read(directory: Path, n_layers: int | None, dtype: str) -> int:
    """The bytes of the tensors a model built with its first ``n_layers`` layers reads, in ``dtype``: the
    embeddings and those layers (its head is tied to the embeddings and never run)."""
    from safetensors import safe_open

    from sinklens.load.device_memory import read_by_layers

    total = 0
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                if n_layers is not None and not read_by_layers(key, n_layers):
                    continue
                total += torch.Size(f.get_slice(key).get_shape()).numel()
    return total * (4 if dtype == "float32" else 2)


def main() -> None:
    from sinklens._io import cache_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--max-layer",
        type=int,
        default=4,
        help="the row's sink-layer search depth (layers 0..max-layer-1; the paper's sink layers are 1-2)",
    )
    parser.add_argument("--dir", type=Path, default=cache_dir() / "bench" / "llama-2-7b-shape")
    args = parser.parse_args()
    build_checkpoint(args.dir)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    results = {}
    for dtype in ("bfloat16", "float32"):
        whole, early = (
            bytes_read(args.dir, None, dtype),
            bytes_read(args.dir, args.max_layer, dtype),
        )
        sides = {"early": early, "whole": whole}
        for side, needed in sides.items():
            if needed > 0.9 * memory:
                print(
                    f"{dtype} {side}: skipped, {needed / 1e9:.1f} GB of weights on a {memory / 1e9:.1f} GB machine"
                )
                continue
            measured = run_worker(
                WORKER,
                args.dir,
                dtype,
                args.max_layer,
                side,
                env={"TOKENIZERS_PARALLELISM": "false"},
            )
            results[f"{dtype}_{side}"] = {**measured, "weights_bytes": needed}
            print(
                f"{dtype} {side}: {measured['seconds']:.1f} s, peak {measured['peak_bytes'] / 1e9:.2f} GB for "
                f"{needed / 1e9:.2f} GB of weights ({measured['peak_bytes'] / needed:.2f}x); {measured['outcome']}"
            )
    summary = {
        "max_layer": args.max_layer,
        "sides": results,
        "targets": {"peak_over_layers_read": 1.5, "peak_over_whole_model": 0.2},
    }
    for dtype in ("bfloat16", "float32"):
        if f"{dtype}_early" in results:
            early_run = results[f"{dtype}_early"]
            summary[f"{dtype}_peak_over_layers_read"] = (
                early_run["peak_bytes"] / early_run["weights_bytes"]
            )
            summary[f"{dtype}_peak_over_whole_model"] = early_run["peak_bytes"] / bytes_read(
                args.dir, None, dtype
            )
            if f"{dtype}_whole" in results:
                summary[f"{dtype}_memory_ratio_early_over_whole"] = (
                    early_run["peak_bytes"] / results[f"{dtype}_whole"]["peak_bytes"]
                )
                summary[f"{dtype}_time_ratio_early_over_whole"] = (
                    early_run["seconds"] / results[f"{dtype}_whole"]["seconds"]
                )
    print_summary("layers", **summary)


if __name__ == "__main__":
    main()
