"""jaxlm's decoder against transformers.Phi3ForCausalLM: fp32 logits within 1e-4 max abs."""

import json

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from hf_util import hf_logits, longrope_factors, phi3_model  # noqa: E402

from jaxlm.convert.hf import ConversionError, load_hf, save_hf  # noqa: E402
from jaxlm.model import forward  # noqa: E402

TOL = 1e-4


def jax_logits(cfg, params, tokens, **kw):
    return np.asarray(forward(cfg, params, jnp.asarray(tokens), **kw))


CASES = {
    "gqa3_partial_untied": dict(num_attention_heads=6, num_key_value_heads=2, partial_rotary_factor=0.75,
                                tie_word_embeddings=False),
    "mha_full_rotary_tied": dict(num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=1.0,
                                 tie_word_embeddings=True),
    "gqa3_partial_tied": dict(tie_word_embeddings=True),
    "sliding_window": dict(sliding_window=8),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match(tmp_path, case):
    model, folder = phi3_model(tmp_path, **CASES[case])
    cfg, params = load_hf(folder)
    assert cfg.num_heads // cfg.num_kv_heads == CASES[case].get("num_attention_heads", 6) // CASES[case].get(
        "num_key_value_heads", 2)
    assert cfg.tie_embeddings == CASES[case].get("tie_word_embeddings", False)
    assert ("lm_head" in params) != cfg.tie_embeddings
    tokens = np.random.default_rng(1).integers(0, 320, (2, 24))
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("seq_len", [24, 40], ids=["below_orig", "above_orig"])
def test_longrope_short_and_long_factors(tmp_path, seq_len):
    short, long = longrope_factors(12)  # rotary dim 12 = head_dim 16 * 0.75
    model, folder = phi3_model(tmp_path, max_position_embeddings=128, original_max_position_embeddings=32,
                               rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long})
    cfg, params = load_hf(folder)
    assert cfg.rope_scaling == "longrope" and cfg.rope_long_factor == tuple(long)
    tokens = np.random.default_rng(2).integers(0, 320, (2, seq_len))
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(jax_logits(cfg, params, tokens), ref, atol=TOL, rtol=0)
    # the two factor sets really differ, so this test would catch using the wrong one
    other = cfg.replace(rope_long_factor=cfg.rope_short_factor, rope_short_factor=cfg.rope_long_factor)
    assert np.abs(jax_logits(other, params, tokens) - ref).max() > 100 * TOL


def test_left_padding(tmp_path):
    model, folder = phi3_model(tmp_path)
    cfg, params = load_hf(folder)
    rng = np.random.default_rng(3)
    tokens = rng.integers(1, 320, (3, 16))
    lengths = np.array([16, 9, 4])
    mask = (np.arange(16)[None] >= 16 - lengths[:, None]).astype(np.int64)
    tokens = np.where(mask == 1, tokens, 0)
    positions = np.maximum(np.cumsum(mask, 1) - 1, 0)
    ref = hf_logits(model, tokens, attention_mask=mask, position_ids=positions)
    out = jax_logits(cfg, params, tokens, segment_ids=jnp.asarray(mask, jnp.int32))
    real = mask == 1
    np.testing.assert_allclose(out[real], ref[real], atol=TOL, rtol=0)
    # each left-padded row equals that prompt run alone, unpadded
    for i, n in enumerate(lengths):
        alone = jax_logits(cfg, params, tokens[i:i + 1, 16 - n:])
        np.testing.assert_allclose(out[i, 16 - n:], alone[0], atol=TOL, rtol=0)


def test_round_trip_hf_jaxlm_hf(tmp_path):
    import transformers

    model, folder = phi3_model(tmp_path, rope_scaling={"type": "longrope", "short_factor": longrope_factors(12)[0],
                                                       "long_factor": longrope_factors(12)[1]},
                               max_position_embeddings=128, original_max_position_embeddings=32)
    cfg, params = load_hf(folder)
    out = tmp_path / "back"
    save_hf(cfg, params, out)
    again = transformers.Phi3ForCausalLM.from_pretrained(out).eval()
    tokens = np.random.default_rng(4).integers(0, 320, (2, 40))
    np.testing.assert_array_equal(hf_logits(again, tokens), hf_logits(model, tokens))
    for name, t in model.state_dict().items():
        np.testing.assert_array_equal(again.state_dict()[name].numpy(), t.numpy(), err_msg=name)


def test_sharded_safetensors_with_index(tmp_path):
    model, folder = phi3_model(tmp_path, tie_word_embeddings=True)
    cfg, params = load_hf(folder)
    sharded = tmp_path / "sharded"
    save_hf(cfg, params, sharded, max_shard_bytes=100_000)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert "lm_head.weight" not in index["weight_map"]  # tied: absent, as in HF
    cfg2, params2 = load_hf(sharded)
    assert cfg2 == cfg
    tokens = np.random.default_rng(5).integers(0, 320, (1, 12))
    np.testing.assert_allclose(jax_logits(cfg2, params2, tokens), hf_logits(model, tokens), atol=TOL, rtol=0)


def test_bfloat16_export_loads_in_transformers(tmp_path):
    import torch
    import transformers

    _, folder = phi3_model(tmp_path)
    cfg, params = load_hf(folder)
    save_hf(cfg, params, tmp_path / "bf16", dtype="bfloat16")
    m = transformers.Phi3ForCausalLM.from_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16
    cfg2, params2 = load_hf(tmp_path / "bf16")
    assert str(params2["embedding"].dtype) == "bfloat16"


def test_clear_errors(tmp_path):
    _, folder = phi3_model(tmp_path)
    hf_cfg = json.loads((folder / "config.json").read_text())

    (folder / "config.json").write_text(json.dumps(dict(hf_cfg, model_type="llama4")))
    with pytest.raises(ConversionError, match="model_type 'llama4'"):
        load_hf(folder)

    (folder / "config.json").write_text(json.dumps(dict(hf_cfg, intermediate_size=200)))
    with pytest.raises(ConversionError, match=r"model.layers.0.mlp.gate_up_proj.weight has shape \(320, 96\)"):
        load_hf(folder)

    from safetensors.numpy import load_file, save_file

    (folder / "config.json").write_text(json.dumps(hf_cfg))
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ConversionError, match="model.layers.1.self_attn.o_proj.weight is missing"):
        load_hf(folder)
