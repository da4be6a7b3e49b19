"""Llama, Mistral and Qwen2 as jaxlm's one decoder: tiny random transformers models go
HF -> jaxlm (fp32 logits within 1e-4) -> HF (identical logits and tensors)."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from hf_util import hf_logits, phi3_model  # noqa: E402

from jaxlm.convert.hf import ConversionError, config_from_hf, load_hf, save_hf  # noqa: E402
from jaxlm.model import forward  # noqa: E402

TOL = 1e-4
BASE = dict(vocab_size=320, hidden_size=96, intermediate_size=160, num_hidden_layers=2, num_attention_heads=6,
            num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, pad_token_id=0,
            bos_token_id=None, eos_token_id=None, tie_word_embeddings=False)

# name -> (transformers class, config class, overrides)
CASES = {
    "llama_gqa_untied": ("Llama", dict(rope_theta=1e5)),
    "llama_tied_head_dim": ("Llama", dict(tie_word_embeddings=True, head_dim=24, num_key_value_heads=3)),
    "llama3_rope_scaling": ("Llama", dict(rope_theta=5e5, max_position_embeddings=128, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "mistral_sliding_window": ("Mistral", dict(sliding_window=8)),
    "mistral_no_window": ("Mistral", dict(sliding_window=None, head_dim=16)),
    "qwen2_qkv_bias": ("Qwen2", dict(use_sliding_window=False)),
    "qwen2_tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1e6)),
}


def hf_model(tmp_path, family, seed=0, **overrides):
    """(transformers model in eval mode, its folder); biases (zero at init) are made random."""
    import torch
    import transformers

    torch.manual_seed(seed)
    cfg = getattr(transformers, f"{family}Config")(**{**BASE, **overrides})
    model = getattr(transformers, f"{family}ForCausalLM")(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.5)
    folder = tmp_path / f"{family.lower()}_{seed}"
    model.save_pretrained(folder)
    return model, folder


def jax_logits(cfg, params, tokens):
    return np.asarray(forward(cfg, params, jnp.asarray(tokens)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_jaxlm_hf(tmp_path, case):
    import transformers

    family, overrides = CASES[case]
    model, folder = hf_model(tmp_path, family, **overrides)
    cfg, params = load_hf(folder)
    assert cfg.qkv_bias == (family == "Qwen2") and cfg.partial_rotary_factor == 1.0
    assert ("lm_head" in params) != cfg.tie_embeddings
    if family == "Qwen2":  # the biases are really there (and random), so the test would catch dropping them
        assert np.abs(params["layers"]["attn"]["k_bias"]).max() > 0.1
    # long enough to cross the sliding window and (llama3) the original context
    tokens = np.random.default_rng(1).integers(0, 320, (2, 40))
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), ref, atol=TOL, rtol=0)

    back = tmp_path / "back"
    save_hf(cfg, params, back, model_type=family.lower())
    assert json.loads((back / "config.json").read_text())["model_type"] == family.lower()
    again = getattr(transformers, f"{family}ForCausalLM").from_pretrained(back).eval()
    np.testing.assert_array_equal(hf_logits(again, tokens), ref)
    theirs = again.state_dict()
    for name, t in model.state_dict().items():
        np.testing.assert_array_equal(theirs[name].numpy(), t.numpy(), err_msg=name)


def test_llama3_scaling_changes_the_logits(tmp_path):
    """The llama3 frequencies matter at these sizes: without them jaxlm would not match."""
    family, overrides = CASES["llama3_rope_scaling"]
    model, folder = hf_model(tmp_path, family, **overrides)
    cfg, params = load_hf(folder)
    assert cfg.rope_scaling == "llama3" and cfg.original_max_position_embeddings == 16
    tokens = np.random.default_rng(2).integers(0, 320, (1, 40))
    ref = hf_logits(model, tokens)
    plain = cfg.replace(rope_scaling="none")
    assert np.abs(jax_logits(plain, params, tokens) - ref).max() > 100 * TOL


def test_default_export_type_and_refusals(tmp_path):
    _, folder = hf_model(tmp_path, "Qwen2")
    cfg, params = load_hf(folder)
    save_hf(cfg, params, tmp_path / "auto")  # q/k/v biases: written as qwen2 when no type is asked for
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["model_type"] == "qwen2"
    with pytest.raises(ConversionError, match="cannot be written as HF llama: q/k/v biases"):
        save_hf(cfg, params, tmp_path / "x", model_type="llama")
    assert not (tmp_path / "x").exists()
    with pytest.raises(ConversionError, match="model_type 'gpt2' is not supported"):
        save_hf(cfg, params, tmp_path / "y", model_type="gpt2")
    _, phi_folder = phi3_model(tmp_path)  # partial rotary: phi3 only
    phi_cfg, phi_params = load_hf(phi_folder)
    with pytest.raises(ConversionError, match="partial rotary"):
        save_hf(phi_cfg, phi_params, tmp_path / "z", model_type="mistral")


def test_config_refusals_name_the_field():
    base = dict(BASE, model_type="llama", hidden_act="silu", num_hidden_layers=2)
    with pytest.raises(ConversionError, match="model_type 'gemma'"):
        config_from_hf(dict(base, model_type="gemma"))
    with pytest.raises(ConversionError, match="rope_scaling type 'yarn' is not supported for llama"):
        config_from_hf(dict(base, rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(ConversionError, match="attention_bias=true"):
        config_from_hf(dict(base, attention_bias=True))
    with pytest.raises(ConversionError, match="use_sliding_window=true"):
        config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True, sliding_window=8))
    from jaxlm.model.config import AttentionConfig, ModelConfig

    ModelConfig(qkv_bias=True, attention=AttentionConfig(impl="retrieval"))  # retrieval recomputes k, v with biases
    # mistral keeps its window; llama has none even when the field is present
    assert config_from_hf(dict(base, model_type="mistral", sliding_window=8)).sliding_window == 8
    assert config_from_hf(dict(base, sliding_window=8)).sliding_window == 0


def test_missing_tensors_are_named_as_the_model_type_stores_them(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, folder = phi3_model(tmp_path)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.qkv_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ConversionError, match=r"model.layers.0.self_attn.qkv_proj.weight is missing"):
        load_hf(folder)

    _, folder = hf_model(tmp_path, "Llama")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ConversionError, match=r"model.layers.1.mlp.up_proj.weight is missing"):
        load_hf(folder)
