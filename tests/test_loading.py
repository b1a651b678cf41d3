import time

import pytest
import torch

from sinklens import SinklensError, load_model, resolve_model


def test_local_hf_directory_loads_a_ready_bridge(tiny, tiny_dir):
    from transformers import AutoModelForCausalLM

    assert tiny.sinklens_source.kind == "hf_dir"
    assert tiny.cfg.n_layers == 6 and tiny.cfg.dtype == torch.float32
    assert not any(module.training for module in tiny.modules())
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    tokens = torch.tensor([[0, 5, 9, 42, 7]])
    with torch.no_grad():
        expected = reference(tokens).logits
    assert torch.allclose(tiny(tokens), expected, atol=1e-5)


@pytest.mark.parametrize(
    "spec, kind",
    [("smollm2-135m-instruct", "alias"), ("gemma-3-270m", "alias"), ("some-org/some-model", "hub")],
)
def test_resolve_model_classifies_specs(spec, kind):
    assert resolve_model(spec).kind == kind


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(SinklensError, match="does not exist.*built-in alias"):
        load_model(str(tmp_path / "nowhere.gguf"))


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(SinklensError, match="without config.json"):
        load_model(str(tmp_path))


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("SINKLENS_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 64)
    with pytest.raises(SinklensError, match="not a readable GGUF model file"):
        load_model(str(bad))


def test_corrupt_weights_in_a_directory_are_a_clear_error(tmp_path, tiny_dir):
    for source in tiny_dir.iterdir():
        (tmp_path / source.name).write_bytes(source.read_bytes())
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SinklensError, match="incomplete or corrupt"):
        load_model(str(tmp_path))


def test_unknown_hub_name_without_network_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(SinklensError) as info:
        load_model("no-such-org/no-such-model-sinklens")
    message = str(info.value)
    assert "not a built-in alias" in message and "smollm2-135m-instruct" in message
    assert "\n" not in message
    assert time.monotonic() - start < 10  # HF_HUB_OFFLINE is honoured: no connection retries


def test_a_directory_without_tokenizer_files_is_a_clear_error(tmp_path, tiny_dir):
    for name in ("config.json", "model.safetensors"):
        (tmp_path / name).write_bytes((tiny_dir / name).read_bytes())
    with pytest.raises(SinklensError, match="no tokenizer files.*tokenizer.save_pretrained"):
        load_model(str(tmp_path))


def test_a_model_that_is_not_a_causal_lm_is_a_clear_error(tmp_path, tiny_dir):
    from transformers import ViTConfig, ViTModel

    ViTModel(
        ViTConfig(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            image_size=8,
            patch_size=4,
        )
    ).save_pretrained(tmp_path)
    for source in tiny_dir.glob("tokenizer*"):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    with pytest.raises(SinklensError, match="is not a causal language model"):
        load_model(str(tmp_path))
