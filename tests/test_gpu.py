"""On a CUDA GPU, sinklens gives the CPU's answers: fused and eager attention, float32 and bfloat16,
the patch, accelerate's device map (whole and offloaded to the CPU), layers on demand and the
benchmark scorer.

Every test here carries the ``gpu`` marker and is skipped without CUDA: CI never needs a GPU.
``python bench/gpu_check.py`` runs them on a GPU machine and records what each measured (the
``record_property`` values) in its JSON.
"""

from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch

import sinklens as sl
from conftest import CORPUS, SINK_LAYER, SINK_NEURON, save_arch
from sinklens.analyses.benchmarks import score_items
from sinklens.load.fused_attention import (
    FusedPositionEmbeddingsAttentionBridge,
    use_fused_attention,
)
from sinklens.load.models import placement
from sinklens.settings import Settings
from sinklens.studies.table import sink_table_row
from test_evaluation import ITEMS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu_check.py)"
    ),
]

DEPTH = 6
NAMES = [
    f"blocks.{layer}.{hook}"
    for layer in range(DEPTH)
    for hook in ("hook_resid_post", "hook_mlp_out", "hook_attn_out", "mlp.hook_post")
]


def _tokens(model, length: int = 40) -> torch.Tensor:
    tokens = torch.randint(
        3, model.cfg.d_vocab, (2, length), generator=torch.Generator().manual_seed(1)
    )
    tokens[:, 0] = model.tokenizer.bos_token_id
    return tokens


def _relative_difference(a, b, names) -> float:
    return max(
        float((a[n].cpu() - b[n].cpu()).abs().max() / b[n].abs().max().clamp_min(1e-12))
        for n in names
    )


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "gemma3"])
def arch_dir(request, tmp_path_factory):
    return save_arch(tmp_path_factory.mktemp(request.param), request.param, DEPTH)


def _paths_taken(model, tokens, *, fused: bool):
    """Run ``NAMES`` with attention fused or eager everywhere; the cache, and per layer the path its
    attention took: ``fused`` where sinklens' SDPA path ran, ``eager`` where TransformerLens'
    step-by-step attention formed the pattern (its ``hook_pattern`` fired: a hook that only watches,
    so it is added to the eager run only)."""
    assert use_fused_attention(model, fused) == (DEPTH if fused else 0)
    for block in model.blocks:
        block.attn.sinklens_path = None
    patterns = []
    watch = (
        []
        if fused
        else [
            (
                f"blocks.{layer}.attn.hook_pattern",
                lambda pattern, hook, layer=layer: patterns.append(layer),
            )
            for layer in range(DEPTH)
        ]
    )
    cache = sl.run_cache(model, tokens, NAMES, interventions=watch)
    paths = [
        "eager" if layer in patterns else block.attn.sinklens_path
        for layer, block in enumerate(model.blocks)
    ]
    return cache, paths


def test_fused_and_eager_attention_agree_on_cuda(arch_dir, record_property):
    model = sl.load_model(str(arch_dir), device="cuda")
    tokens = _tokens(model)
    eager, eager_paths = _paths_taken(model, tokens, fused=False)
    # the first run was TransformerLens' own attention on every layer
    assert eager_paths == ["eager"] * DEPTH
    assert all(
        type(block.attn) is not FusedPositionEmbeddingsAttentionBridge for block in model.blocks
    )
    fused, fused_paths = _paths_taken(model, tokens, fused=True)
    assert fused_paths == ["fused"] * DEPTH  # the second was the SDPA kernel on every layer
    record_property("paths", f"{eager_paths[0]} then {fused_paths[0]} on all {DEPTH} layers")
    difference = _relative_difference(fused, eager, NAMES)
    record_property("max_relative_difference", difference)
    assert difference <= 1e-5


def test_float32_on_cuda_equals_float32_on_the_cpu(arch_dir, record_property):
    on_cpu, on_gpu = (sl.load_model(str(arch_dir), device=device) for device in ("cpu", "cuda"))
    tokens = _tokens(on_cpu)
    difference = _relative_difference(
        sl.run_cache(on_gpu, tokens, NAMES), sl.run_cache(on_cpu, tokens, NAMES), NAMES
    )
    record_property("max_relative_difference", difference)
    assert difference <= 1e-4


def _row(tiny_dir, long_corpus_file, **placement_):
    settings = Settings(
        model=str(tiny_dir),
        corpus=str(long_corpus_file),
        corpus_chars=400,
        words=["the", "you"],
        n_repeats=60,
        **placement_,
    )
    return sink_table_row(settings.load_model(early_layers_only=True), None, settings).summary()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_table_row_on_cuda_finds_what_the_cpu_finds(
    tiny_dir, long_corpus_file, dtype, record_property
):
    on_cpu = _row(tiny_dir, long_corpus_file, device="cpu")
    on_gpu = _row(tiny_dir, long_corpus_file, device="cuda", dtype=dtype)
    assert on_gpu["device"] == "cuda:0" and on_gpu["dtype"] == dtype
    assert on_gpu["sink_layer"] == on_cpu["sink_layer"] == SINK_LAYER
    assert (
        on_gpu["sink_neurons"] == on_cpu["sink_neurons"] and SINK_NEURON in on_gpu["sink_neurons"]
    )
    assert on_gpu["first_token"]["id"] == on_cpu["first_token"]["id"]
    change = abs(on_gpu["first_token_norm"] / on_cpu["first_token_norm"] - 1)
    record_property("first_token_norm_relative_change", change)
    assert change <= (1e-5 if dtype == "float32" else 0.02)


@pytest.mark.parametrize("kind", ["bridge", "hf"])
def test_the_patch_installs_and_uninstalls_on_cuda(tiny_dir, tiny, kind):
    patch = sl.patch_for(tiny, [(SINK_LAYER, SINK_NEURON), (SINK_LAYER, 7)], hook="gate")
    model = (
        sl.load_model(str(tiny_dir), device="cuda")
        if kind == "bridge"
        else sl.load_hf_model(str(tiny_dir), device="cuda")[0]
    )
    tokens = sl.text_tokens(tiny, CORPUS)[:, :32].cuda()

    def logits():
        with torch.inference_mode():
            out = model(tokens)
        return out if kind == "bridge" else out.logits

    before = logits()
    with patch.installed(model):
        patched = logits()
    assert torch.equal(logits(), before) and not torch.allclose(patched, before, atol=1e-4)
    with patch.installed(tiny), torch.inference_mode():
        on_cpu = tiny(tokens.cpu())
    torch.testing.assert_close(patched.cpu(), on_cpu, rtol=1e-4, atol=1e-4)


def test_auto_on_one_gpu_places_the_whole_model_there(tiny_dir, tiny):
    model = sl.load_model(str(tiny_dir), device="auto")
    assert {str(p.device) for p in model.original_model.parameters()} == {"cuda:0"}
    assert placement(model)["device"] == "cuda:0"
    tokens = _tokens(tiny)
    difference = _relative_difference(
        sl.run_cache(model, tokens, NAMES), sl.run_cache(tiny, tokens, NAMES), NAMES
    )
    assert difference <= 1e-4


def test_auto_offloads_what_max_memory_leaves_off_the_gpu_and_gives_the_cpus_numbers(
    tiny_dir, tiny, record_property, caplog, tmp_path, monkeypatch
):
    monkeypatch.setenv("SINKLENS_CACHE", str(tmp_path / "cache"))
    layer_bytes = sum(p.numel() * 4 for p in tiny.original_model.model.layers[0].parameters())
    embed_bytes = tiny.original_model.model.embed_tokens.weight.numel() * 4
    with caplog.at_level(logging.INFO, logger="sinklens"):  # the command line's --max-memory text
        model = sl.load_model(
            str(tiny_dir), device="auto", max_memory=f"0={embed_bytes + 3 * layer_bytes},cpu=1GB"
        )
    places = {str(place) for place in model.original_model.hf_device_map.values()}
    record_property("device_map", str(model.original_model.hf_device_map))
    assert places == {"0", "cpu"}
    notes = [
        r.getMessage()
        for r in caplog.records
        if r.name == "sinklens" and "accelerate placed" in r.getMessage()
    ]
    assert len(notes) == 1 and " on the CPU: " in notes[0]
    record_property("offload_note", notes[0])
    tokens = _tokens(tiny)
    difference = _relative_difference(
        sl.run_cache(model, tokens, NAMES), sl.run_cache(tiny, tokens, NAMES), NAMES
    )
    record_property("max_relative_difference", difference)
    assert difference <= 1e-4


def test_layers_on_demand_move_only_their_layers_to_the_gpu(arch_dir, record_property):
    torch.cuda.empty_cache()
    start = torch.cuda.memory_allocated()
    early = sl.load_model(str(arch_dir), device="cuda", n_layers=2)
    early_bytes = torch.cuda.memory_allocated() - start
    whole = sl.load_model(str(arch_dir), device="cuda")
    whole_bytes = torch.cuda.memory_allocated() - start - early_bytes
    weights = {
        p.data_ptr(): p.numel() * p.element_size() for p in early.original_model.parameters()
    }
    record_property("early_over_whole_bytes", early_bytes / whole_bytes)
    assert all(p.device.type == "cuda" for p in early.original_model.parameters())
    assert len(early.original_model.model.layers) == 2 and early_bytes < whole_bytes
    assert (
        early_bytes <= 1.05 * sum(weights.values()) + 2**20
    )  # its weights and buffers, nothing of later layers
    tokens = _tokens(whole)
    names = [name for name in NAMES if name.startswith(("blocks.0.", "blocks.1."))]
    assert (
        _relative_difference(
            sl.run_cache(early, tokens, names), sl.run_cache(whole, tokens, names), names
        )
        == 0.0
    )


def test_the_scorer_on_cuda_equals_the_cpus(tiny_dir, record_property):
    (on_cpu, tokenizer), (on_gpu, _) = (
        sl.load_hf_model(str(tiny_dir), device=device) for device in ("cpu", "cuda")
    )
    cpu_scores, gpu_scores = (score_items(model, tokenizer, ITEMS) for model in (on_cpu, on_gpu))
    differences = [
        abs(a - b) for s, t in zip(cpu_scores, gpu_scores) for a, b in zip(s.logprob, t.logprob)
    ]
    record_property("max_logprob_difference", max(differences))
    assert max(differences) <= 1e-4
    assert [s.greedy for s in cpu_scores] == [s.greedy for s in gpu_scores]


def test_the_command_line_runs_a_table_row_on_cuda_in_bfloat16(tiny_dir, long_corpus_file, capsys):
    import json

    from sinklens.cli import main

    assert (
        main(
            [
                "table",
                "--model",
                str(tiny_dir),
                "--corpus",
                str(long_corpus_file),
                "--corpus-chars",
                "400",
                "--words",
                "the",
                "--n-repeats",
                "60",
                "--device",
                "cuda",
                "--dtype",
                "bfloat16",
                "--json",
            ]
        )
        == 0
    )
    row = json.loads(capsys.readouterr().out)
    assert (row["device"], row["dtype"], row["sink_layer"]) == ("cuda:0", "bfloat16", SINK_LAYER)
    assert SINK_NEURON in row["sink_neurons"]


def test_the_weights_paid_to_chosen_keys_from_the_fused_kernel_are_the_patterns_on_cuda(
    arch_dir, record_property
):
    """The indicator-value kernel on CUDA gives each query's weight on the chosen keys, as the
    pattern does."""
    from sinklens.load.fused_attention import key_weights

    model = sl.load_model(str(arch_dir), device="cuda")
    tokens = _tokens(model)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(DEPTH)]
    patterns = sl.run_cache(model, tokens, names)
    keys = torch.tensor([0, 7, tokens.shape[1] - 1])
    with key_weights(model, lambda layer: keys) as weights:
        sl.run_cache(model, tokens, [f"blocks.{DEPTH - 1}.hook_resid_post"])
    difference = max(
        float((weights.found[layer].cpu() - patterns[names[layer]].cpu()[..., keys]).abs().max())
        for layer in range(DEPTH)
    )
    record_property("max_abs_difference", difference)
    assert {block.attn.sinklens_path for block in model.blocks} == {"fused"} and difference <= 1e-5


def test_the_sink_census_on_cuda_finds_what_the_cpu_finds(
    tiny_dir, tiny, long_corpus_file, record_property
):
    settings = Settings(corpus=str(long_corpus_file), corpus_chars=400)
    tokens = sl.text_tokens(tiny, CORPUS[:300])
    on_cpu = sl.find_sinks(tiny, tokens, settings)
    on_gpu = sl.find_sinks(sl.load_model(str(tiny_dir), device="cuda"), tokens, settings)
    assert [(s.position, s.first_layer, s.n_layers, s.neurons) for s in on_gpu.sinks] == [
        (s.position, s.first_layer, s.n_layers, s.neurons) for s in on_cpu.sinks
    ]
    change = max(
        abs(a.attention_share - b.attention_share) for a, b in zip(on_gpu.sinks, on_cpu.sinks)
    )
    record_property("max_attention_share_difference", change)
    assert change <= 1e-4


def test_on_cuda_a_model_loads_in_its_checkpoints_dtype_unless_one_is_given(
    tiny_dir, tmp_path, record_property
):
    folder = tmp_path / "declares-bfloat16"
    shutil.copytree(tiny_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"
    (folder / "config.json").write_text(json.dumps(config))
    default = sl.load_model(str(folder), device="cuda")
    assert placement(default) == {"dtype": "bfloat16", "device": "cuda:0"}
    assert (
        placement(sl.load_model(str(folder), device="cuda", dtype="float32"))["dtype"] == "float32"
    )
    assert placement(sl.load_model(str(folder), device="cpu"))["dtype"] == "float32"
    cache = sl.run_cache(default, _tokens(default), NAMES[:4])
    assert all(cache[name].dtype == torch.float32 for name in NAMES[:4])  # statistics stay float32
