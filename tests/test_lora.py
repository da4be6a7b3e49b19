"""LoRA adapters in the one model (jaxlm.model.lora): axes by spec, routing per example (mixed batch =
separate runs, KV-cache decode = uncached), no adapter = the base exactly, merge = unmerged,
unmerge restores W; Phi-4-multimodal's entry (splicing, input modes); clear config errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.infer.generate import Generator
from jaxlm.model import Decoder, LoraConfig, ModelConfig, forward, init_params, logical_axes, lora
from jaxlm.model import multimodal as mm

BASE = ModelConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4, num_kv_heads=2,
                   partial_rotary_factor=0.5, tie_embeddings=False, max_position_embeddings=64)
THREE = BASE.replace(lora=LoraConfig(rank=4, alpha=8.0, adapters=("de", "fr", "es"), ranks=(4, 2, 3)))
TOKENS = jnp.asarray(np.random.default_rng(0).integers(1, 96, (3, 10)))


def randomized(cfg, seed=0):
    """Params whose adapters are all random (B too: a fresh B = 0 adapter would hide every bug)."""
    p = init_params(cfg, jax.random.key(seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 1000))
    return jax.tree_util.tree_map_with_path(
        lambda path, x: jax.random.normal(next(keys), x.shape) * 0.2 if lora.is_adapter(path) else x, p)


def test_adapters_take_the_base_weights_axes():
    from jax.sharding import PartitionSpec

    axes = jax.tree.map(tuple, logical_axes(THREE), is_leaf=lambda x: isinstance(x, PartitionSpec))
    attn, mlp = axes["layers"]["attn"], axes["layers"]["mlp"]
    for name in ("de", "fr", "es"):
        ad, am = attn["lora"][name], mlp["lora"][name]
        assert ad["q_a"] == ("layers", "embed", None) and ad["q_b"] == ("layers", None, "heads", "head_dim")
        assert ad["k_b"] == ("layers", None, "kv_heads", "head_dim")
        assert ad["o_a"] == ("layers", "heads", "head_dim", None) and ad["o_b"] == ("layers", None, "embed")
        assert am["wi_a"] == ("layers", "embed", None, None) and am["wi_b"] == ("layers", None, None, "mlp")
        assert am["wo_a"] == ("layers", "mlp", None) and am["wo_b"] == ("layers", None, "embed")
    # A's input axes are the base weight's input axes, B's output axes its output axes
    assert attn["q"][:2] == attn["lora"]["de"]["q_a"][:2] and attn["q"][2:] == attn["lora"]["de"]["q_b"][2:]
    assert mlp["wi"][:2] == mlp["lora"]["de"]["wi_a"][:2] and mlp["wi"][2:] == mlp["lora"]["de"]["wi_b"][2:]
    p = init_params(THREE, jax.random.key(0))
    assert p["layers"]["attn"]["lora"]["fr"]["q_a"].shape == (2, 32, 2)  # per-adapter rank
    assert p["layers"]["mlp"]["lora"]["es"]["wi_b"].shape == (2, 3, 2, 48)


def test_fresh_adapters_change_nothing_and_a_is_kaiming_uniform():
    p = init_params(THREE, jax.random.key(0))
    ref = forward(lora.off(THREE), p, TOKENS)
    np.testing.assert_array_equal(forward(THREE, p, TOKENS, adapter_ids=jnp.asarray([0, 1, 2])), ref)
    a = np.asarray(p["layers"]["mlp"]["lora"]["de"]["wo_a"])  # fan_in = intermediate_size
    bound = 1 / np.sqrt(48)
    assert np.abs(a).max() <= bound and abs(a.std() - bound / np.sqrt(3)) < 0.15 * bound
    assert not np.asarray(p["layers"]["attn"]["lora"]["de"]["q_b"]).any()


def test_no_adapter_equals_the_base_model_exactly():
    p = randomized(THREE)
    base = forward(BASE, lora.base_params(p), TOKENS)  # a model that never had adapters
    np.testing.assert_array_equal(forward(lora.off(THREE), p, TOKENS), base)
    np.testing.assert_array_equal(forward(THREE, p, TOKENS, adapter_ids=jnp.full(3, lora.NONE)), base)
    assert np.abs(np.asarray(forward(THREE, p, TOKENS)) - np.asarray(base)).max() > 0.1


def test_mixed_batch_equals_separate_runs():
    p = randomized(THREE)
    ids = jnp.asarray([2, lora.NONE, 0])
    mixed = np.asarray(forward(THREE, p, TOKENS, adapter_ids=ids))
    for row, i in enumerate(np.asarray(ids)):
        alone = forward(THREE, p, TOKENS[row:row + 1], adapter_ids=jnp.asarray([i]))
        np.testing.assert_allclose(mixed[row], np.asarray(alone)[0], atol=1e-6, rtol=0)
        if i >= 0:  # the static one-adapter model agrees too
            one = forward(lora.only(THREE, THREE.lora.adapters[i]), p, TOKENS[row:row + 1])
            np.testing.assert_allclose(mixed[row], np.asarray(one)[0], atol=1e-5, rtol=0)
    # without ids every row uses the first adapter
    np.testing.assert_array_equal(forward(THREE, p, TOKENS), forward(THREE, p, TOKENS, adapter_ids=jnp.zeros(3, int)))


def test_merge_equals_unmerged_and_unmerge_restores_w():
    p = randomized(THREE)
    for name in ("fr", ["de", "es"]):
        merged = lora.merge(THREE, p, name)
        ref = forward(lora.only(THREE, name), p, TOKENS) if isinstance(name, str) else None
        if ref is not None:
            np.testing.assert_allclose(forward(lora.off(THREE), merged, TOKENS), ref, atol=1e-4, rtol=0)
        back = lora.unmerge(THREE, merged, name)
        for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(p)):
            np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    # several merged: W + s1 B1 A1 + s2 B2 A2, the sum of both updates
    both = lora.merge(THREE, p, ["de", "es"])
    d = {k: lora.delta_weights(THREE, p, "de")[k] + lora.delta_weights(THREE, p, "es")[k] for k in ("layers/attn/q",)}
    np.testing.assert_allclose(both["layers"]["attn"]["q"] - p["layers"]["attn"]["q"], d["layers/attn/q"], atol=1e-6)


def test_rslora_scale_and_rank_pattern():
    c = BASE.replace(lora=LoraConfig(rank=4, alpha=8.0, use_rslora=True, rank_pattern=(("attn/o$", 6),),
                                     alpha_pattern=(("mlp/wo$", 3.0),)))
    assert c.lora.settings(0, "layers/attn/q") == (4, 4.0, 0.0)  # 8 / sqrt(4)
    assert c.lora.settings(0, "layers/attn/o")[:2] == (6, 8 / np.sqrt(6))
    assert c.lora.settings(0, "layers/mlp/wo")[:2] == (4, 1.5)
    p = init_params(c, jax.random.key(0))
    assert p["layers"]["attn"]["lora"]["default"]["o_a"].shape == (2, 4, 8, 6)


def test_dropout_only_with_a_dropout_rng():
    c = BASE.replace(lora=LoraConfig(rank=4, dropout=0.5))
    p = randomized(c)
    m = Decoder(c)
    a = m.apply({"params": p}, TOKENS)
    np.testing.assert_array_equal(a, m.apply({"params": p}, TOKENS))
    b = m.apply({"params": p}, TOKENS, rngs={"dropout": jax.random.key(1)})
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-3


def test_cached_decode_equals_uncached_with_routed_adapters():
    """Greedy decoding with the KV cache, a different adapter per row, equals recomputing every
    prefix without a cache (the failure users of other JAX trainers report: fine first token, then
    garbage, because the decode step forgot the adapters)."""
    p = randomized(THREE, seed=3)
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16]]
    ids = np.asarray([1, 2, lora.NONE], np.int32)
    n = 8
    got = Generator(THREE).generate(p, prompts, max_new_tokens=n, adapter_ids=ids).tokens
    for row, prompt in enumerate(prompts):
        seq = list(prompt)
        for _ in range(n):
            logits = forward(THREE, p, jnp.asarray([seq]), adapter_ids=jnp.asarray(ids[row:row + 1]))
            seq.append(int(jnp.argmax(logits[0, -1])))
        assert got[row] == seq[len(prompt):], row
    plain = Generator(lora.off(THREE)).generate(p, prompts, max_new_tokens=n).tokens
    assert plain[2] == got[2] and (plain[0] != got[0] or plain[1] != got[1])  # adapters steer the others


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"model.lora.target 'layers/attn/qkv' matches no linear layer.*layers/attn/q"):
        BASE.replace(lora=LoraConfig(rank=4, target="layers/attn/qkv"))
    with pytest.raises(ConfigError, match=r"model.lora.ranks has 1 values for 2 adapters"):
        LoraConfig(rank=4, adapters=("a", "b"), ranks=(4,))
    with pytest.raises(ConfigError, match=r"model.lora.adapters: 'my adapter' is not a valid adapter name"):
        LoraConfig(rank=4, adapters=("my adapter",))
    with pytest.raises(ConfigError, match=r"model.lora.rank_pattern regex 'wi_gate' matches none of the adapted"):
        BASE.replace(lora=LoraConfig(rank=4, rank_pattern=(("wi_gate", 2),)))
    with pytest.raises(ConfigError, match=r"adapter 'it' is not one of the model's adapters \('de', 'fr', 'es'\)"):
        lora.index(THREE, "it")


# ----------------------------------------------------------------------------- multimodal entry
MM_CFG = BASE.replace(vocab_size=128, lora=LoraConfig(rank=4, alpha=8.0, adapters=("vision", "speech"),
                                                      ranks=(4, 6), alphas=(8.0, 12.0), dropouts=(0.0, 0.01)))
MMC = mm.MultimodalConfig(image_token_id=120, audio_token_id=121, vision_width=24, audio_width=20)


def _mm_model():
    return mm.MultimodalLM(MM_CFG, MMC, mm.ViTEncoder(width=24, depth=1, heads=2, patch=4),
                           mm.ConformerEncoder(width=20, depth=1, heads=2))


def _mm_inputs():
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, 100, (4, 14))
    tokens[0, 3:7] = 120  # 4 image tokens (a 8x8 image in 4x4 patches)
    tokens[1, 2:5] = 121  # 3 audio tokens (6 frames, 2x subsampled)
    tokens[3, 1:5], tokens[3, 8:11] = 120, 121
    images = rng.normal(size=(4, 8, 8, 3)).astype(np.float32)
    audio = rng.normal(size=(4, 6, 5)).astype(np.float32)
    modes = np.asarray([mm.VISION, mm.SPEECH, mm.LANGUAGE, mm.VISION_SPEECH])
    return jnp.asarray(tokens), jnp.asarray(modes), jnp.asarray(images), jnp.asarray(audio)


def test_splicing_changes_exactly_the_modality_positions():
    model = _mm_model()
    tokens, modes, images, audio = _mm_inputs()
    params = mm.init(model, jax.random.key(0), tokens, modes, images, audio)
    plain = model.apply({"params": params}, tokens, modes, method=mm.MultimodalLM.embed_inputs)
    spliced = model.apply({"params": params}, tokens, modes, images, audio, method=mm.MultimodalLM.embed_inputs)
    changed = np.asarray(jnp.any(plain != spliced, axis=-1))
    np.testing.assert_array_equal(changed, np.isin(np.asarray(tokens), [120, 121]))
    # the k-th image token of a row takes the k-th projected patch
    feats = model.apply({"params": params}, images, method=lambda m, x: m.vision_projector(m.vision_encoder(x)))
    np.testing.assert_allclose(spliced[0, 3:7], feats[0, :4], atol=1e-6)
    # VISION_SPEECH audio goes through its own projector head
    sp = model.apply({"params": params}, audio, method=lambda m, a: m.audio_projector["speech"](m.audio_encoder(a)))
    vs = model.apply({"params": params}, audio,
                     method=lambda m, a: m.audio_projector["vision_speech"](m.audio_encoder(a)))
    np.testing.assert_allclose(spliced[1, 2:5], sp[1, :3], atol=1e-6)
    np.testing.assert_allclose(spliced[3, 8:11], vs[3, :3], atol=1e-6)
    # causal: logits before the first modality token do not depend on the features
    a = model.apply({"params": params}, tokens, modes, images, audio)
    b = model.apply({"params": params}, tokens, modes, images * 0, audio * 0)
    np.testing.assert_array_equal(a[0, :3], b[0, :3])
    assert np.abs(np.asarray(a[0, 3:] - b[0, 3:])).max() > 1e-4


def test_input_mode_selects_the_adapter():
    model = _mm_model()
    tokens, modes, images, audio = _mm_inputs()
    params = mm.init(model, jax.random.key(0), tokens, modes, images, audio)
    dec = randomized(MM_CFG, seed=4)
    params = dict(params, decoder=dec)
    out = model.apply({"params": params}, tokens, modes)  # text only: modes still route the adapters
    for row, ids in enumerate(([0], [1], [lora.NONE], [0])):  # vision, speech, none, vision
        ref = forward(MM_CFG, dec, tokens[row:row + 1], adapter_ids=jnp.asarray(ids))
        np.testing.assert_allclose(out[row], ref[0], atol=1e-5, rtol=0)
    with pytest.raises(ConfigError, match="2 image tokens .* but only 1 image features|a row has 4 image tokens"):
        mm.features_check(tokens, MMC, n_image=1, n_audio=None)
