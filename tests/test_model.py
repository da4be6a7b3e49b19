"""The decoder's own properties: packing, scan over depth, parameter accounting, dtypes, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.model import Decoder, ModelConfig, forward, init_params, logical_axes

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  partial_rotary_factor=0.75, init_std=0.1)
LOGICAL = {"layers", "embed", "heads", "kv_heads", "head_dim", "mlp", "vocab", None}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def test_segments_equal_running_each_segment_alone(params):
    rng = np.random.default_rng(0)
    lengths = [5, 9, 3, 7]
    docs = [rng.integers(0, 256, n) for n in lengths]
    tokens = np.concatenate(docs)[None]
    seg = np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)])[None]
    packed = np.asarray(forward(CFG, params, jnp.asarray(tokens), segment_ids=jnp.asarray(seg)))
    start = 0
    for d in docs:
        alone = np.asarray(forward(CFG, params, jnp.asarray(d[None])))
        np.testing.assert_allclose(packed[0, start:start + len(d)], alone[0], atol=1e-5, rtol=0)
        start += len(d)
    # without segment ids the documents would see each other: the test can tell
    unpacked = np.asarray(forward(CFG, params, jnp.asarray(tokens)))
    assert np.abs(unpacked[0, 5:14] - packed[0, 5:14]).max() > 1e-3


def test_explicit_positions_override_defaults(params):
    tokens = jnp.arange(8)[None] % 256
    base = forward(CFG, params, tokens)
    # RoPE is relative: a uniform shift changes nothing, a gap changes what follows it
    shifted = forward(CFG, params, tokens, positions=jnp.arange(8)[None] + 3)
    np.testing.assert_allclose(shifted, base, atol=1e-5)
    gap = forward(CFG, params, tokens, positions=jnp.asarray([[0, 1, 2, 3, 20, 21, 22, 23]]))
    np.testing.assert_allclose(gap[:, :4], base[:, :4], atol=1e-5)
    assert jnp.abs(gap[:, 4:] - base[:, 4:]).max() > 1e-3


@pytest.mark.parametrize("policy", ["none", "full"])
def test_program_size_does_not_grow_with_depth(policy):
    def hlo(layers):
        cfg = CFG.replace(num_layers=layers, remat_policy=policy)
        p = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))

        def loss(p, t):
            return forward(cfg, p, t).mean()
        return len(jax.jit(jax.grad(loss)).lower(p, jnp.zeros((2, 16), jnp.int32)).as_text())

    assert hlo(16) < 1.1 * hlo(2)


@pytest.mark.parametrize("tied,fused", [(True, True), (False, False)])
def test_num_params_counts_every_parameter(tied, fused):
    cfg = CFG.replace(tie_embeddings=tied, fused_mlp=fused, head_dim=24)
    p = init_params(cfg, jax.random.key(0))
    assert cfg.num_params == sum(x.size for x in jax.tree.leaves(p))
    non_emb = sum(x.size for x in jax.tree.leaves({k: v for k, v in p.items() if k not in ("embedding", "lm_head")}))
    assert cfg.num_non_embedding_params == non_emb


def test_flops_per_token_palm_formula(params):
    # independent count from the parameter shapes: every kernel inside the blocks plus the head
    matmul = sum(x.size for x in jax.tree.leaves(params["layers"]["attn"]) + jax.tree.leaves(params["layers"]["mlp"]))
    matmul += params["embedding"].size  # the (tied) head is a matmul; the lookup is not
    t = 128
    expected = 6 * matmul + 12 * CFG.num_layers * CFG.num_heads * CFG.head_size * t
    assert CFG.flops_per_token(t) == expected
    assert CFG.flops_per_token(t, training=False) == expected / 3


def test_every_parameter_has_logical_axes():
    axes = logical_axes(CFG.replace(tie_embeddings=False))
    p = init_params(CFG.replace(tie_embeddings=False), jax.random.key(0))
    flat_axes = jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    flat = jax.tree.leaves(p)
    assert len(flat_axes) == len(flat)
    for spec, x in zip(flat_axes, flat):
        assert len(spec) == x.ndim and set(spec) <= LOGICAL
    assert axes["layers"]["attn"]["q"] == jax.sharding.PartitionSpec("layers", "embed", "heads", "head_dim")
    assert axes["layers"]["attn"]["k"] == jax.sharding.PartitionSpec("layers", "embed", "kv_heads", "head_dim")
    assert axes["lm_head"] == jax.sharding.PartitionSpec("embed", "vocab")


def test_bf16_compute_with_fp32_params(params):
    cfg16 = CFG.replace(dtype="bfloat16")
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 256, (2, 16)))
    ref = forward(CFG, params, tokens)
    out = forward(cfg16, params, tokens)
    assert out.dtype == jnp.float32 and params["embedding"].dtype == jnp.float32
    assert jnp.abs(out - ref).max() < 5e-2 * jnp.abs(ref).max()
    p16 = init_params(CFG.replace(param_dtype="bfloat16"), jax.random.key(0))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p16))


def test_fused_and_split_mlp_agree(params):
    split = CFG.replace(fused_mlp=False)
    sp = jax.tree.map(lambda x: x, params)
    wi = sp["layers"]["mlp"].pop("wi")
    sp["layers"]["mlp"]["wi_gate"], sp["layers"]["mlp"]["wi_up"] = wi[:, :, 0], wi[:, :, 1]
    tokens = jnp.arange(12)[None]
    np.testing.assert_allclose(forward(split, sp, tokens), forward(CFG, params, tokens), atol=1e-6)


def test_remat_policies_keep_gradients(params):
    tokens = jnp.asarray(np.random.default_rng(2).integers(0, 256, (2, 16)))

    def grads(policy):
        cfg = CFG.replace(remat_policy=policy)
        loss = lambda p: jnp.mean(jax.nn.logsumexp(Decoder(cfg).apply({"params": p}, tokens), -1))
        return jax.jit(jax.grad(loss))(params)

    g0 = grads("none")
    for policy in ("full", "dots", "dots_no_batch", "save_attn_out"):
        for a, b in zip(jax.tree.leaves(g0), jax.tree.leaves(grads(policy))):
            np.testing.assert_allclose(a, b, atol=1e-6, err_msg=policy)
