"""Retrieval attention (Unlimiformer): equals full attention when it can, folding, search, chunked
prefill, sharded datastore, one compilation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.infer.generate import Generator
from jaxlm.infer.retrieval import LongGenerator, chunk_windows, position_plan
from jaxlm.model import Decoder, ModelConfig, forward, init_params
from jaxlm.model.config import AttentionConfig, RetrievalConfig
from jaxlm.model.retrieval import fold_queries, search


def config(**retrieval):
    r = RetrievalConfig(**{**dict(layers=(0, 1), top_k=64, window=8, overlap=16, context=64), **retrieval})
    return ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, partial_rotary_factor=0.75, init_std=0.3, max_position_embeddings=64,
                       attention=AttentionConfig(impl="retrieval", retrieval=r))


CFG = config()
SMALL_K = config(layers=(), top_k=4)  # default layers: the upper half (layer 1)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def gen():
    return LongGenerator(CFG)


def ids_of(n, seed=0):
    return [int(t) for t in np.random.default_rng(seed).integers(1, 128, n)]


def test_k_covering_the_input_is_full_attention(params, gen):
    ids = ids_of(40)  # fits the 64-token context with 8 new tokens: exact positions; window 8 < 40
    logits = gen.prompt_logits(params, ids, max_new_tokens=8)
    full = forward(CFG, params, jnp.asarray([ids]))[0, -8:]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=1e-4, rtol=1e-4)
    out = gen.generate(params, ids, max_new_tokens=8)
    assert out.exact_positions and out.windows == 1
    assert out.tokens == Generator(CFG).generate(params, [ids], max_new_tokens=8).tokens


def test_query_folding_equals_explicit_keys():
    rng = np.random.default_rng(1)
    b, t, hq, hkv, dh, d, s = 2, 3, 6, 2, 8, 16, 10
    q = jnp.asarray(rng.normal(size=(b, t, hq, dh)), jnp.float32)
    wk = jnp.asarray(rng.normal(size=(d, hkv, dh)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    folded = jnp.einsum("bthd,bsd->bths", fold_queries(q, wk), h)
    keys = jnp.einsum("bsd,dhk->bshk", h, wk)  # [B, S, Hkv, D]
    explicit = jnp.einsum("bthk,bshk->bths", q, jnp.repeat(keys, hq // hkv, axis=2))
    np.testing.assert_allclose(np.asarray(folded), np.asarray(explicit), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("approx", [False, True])
def test_search_finds_planted_needles(approx):
    rng = np.random.default_rng(2)
    s, d, dh = 8192, 32, 8
    wk = jnp.asarray(rng.normal(size=(d, 1, dh)) / np.sqrt(d), jnp.float32)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, dh)), jnp.float32)
    qf = fold_queries(q, wk)[0, 0, 0]
    h = rng.normal(size=(1, s, d)).astype(np.float32)
    planted = [17, 4000, 8100]
    for i in planted:  # aligned with the folded query, otherwise as large as the random entries
        h[0, i] = np.asarray(qf) / np.linalg.norm(qf) * np.sqrt(d) + 0.1 * rng.normal(size=d)
    valid = np.ones((1, s), bool)
    valid[0, 4000] = False  # in the local window: must not be retrieved
    _, idx = search(fold_queries(q, wk), jnp.asarray(h), jnp.asarray(valid), 2, approx=approx)
    assert sorted(np.asarray(idx).ravel().tolist()) == [17, 8100]


@pytest.mark.parametrize("n", [5, 16, 17, 100])
def test_windows_encode_every_token_once(n):
    wins = chunk_windows(n, 16, 4)
    seen = [t for w in wins for t in range(w.keep, w.end)]
    assert seen == list(range(n))
    for i, w in enumerate(wins):
        assert w.end - w.read <= 16
        assert w.keep - w.read == (0 if i == 0 else 4)  # every later window re-reads `overlap` tokens
    assert len(wins) == {5: 1, 16: 1, 17: 2, 100: 8}[n]


def test_positions_exact_or_rescaled():
    pos, start, exact = position_plan(40, 8, 8, 64)
    assert exact and start == 32 and pos.tolist() == list(range(40))
    pos, start, exact = position_plan(1000, 8, 8, 64)  # P = 64 - 8 - 8 = 48
    assert not exact and start == 48 and pos[0] == 0 and pos[991] == 47
    assert np.all(np.diff(pos[:992]) >= 0) and start + 8 + 8 == 64  # generated tokens end at C - 1


def test_datastore_is_the_forward_attention_inputs(params, gen):
    collect = jax.jit(lambda p, t: Decoder(CFG, collect=True).apply({"params": p}, t, return_hidden=True)[1])
    ids = ids_of(50, 3)
    rctx, info = gen.datastore(params, ids, max_new_tokens=4)
    collected = collect(params, jnp.asarray([ids]))
    np.testing.assert_allclose(np.asarray(rctx["h"][:, 0, :50]), np.asarray(collected[:, 0]), atol=1e-5)
    assert np.asarray(rctx["valid"][0]).tolist()[:50] == [True] * 42 + [False] * 8  # the window is local
    # a long input: window 2 (reads [96, 160), keeps [112, 160)) is encoded from its own tokens
    ids = ids_of(200, 4)
    rctx, info = gen.datastore(params, ids, max_new_tokens=4)
    assert info["windows"] == 4 and not info["exact"]
    col = collect(params, jnp.asarray([ids[96:160]]))
    np.testing.assert_allclose(np.asarray(rctx["h"][:, 0, 112:160]), np.asarray(col[:, 0, 16:]), atol=1e-5)


def test_sharded_datastore_equals_unsharded():
    from jax.sharding import Mesh

    params = init_params(SMALL_K, jax.random.key(1))
    gen = LongGenerator(SMALL_K)
    ids = ids_of(300, 5)
    mesh = Mesh(np.asarray(jax.devices()[:8]), ("data",))
    rctx, _ = gen.datastore(params, ids, 6, mesh=mesh)
    assert len(rctx["h"].sharding.device_set) == 8 and rctx["h"].addressable_shards[0].data.shape[2] == 512 // 8
    one = gen.generate(params, ids, max_new_tokens=6)
    eight = gen.generate(params, ids, max_new_tokens=6, mesh=mesh)
    assert one.tokens == eight.tokens
    np.testing.assert_allclose(np.asarray(gen.prompt_logits(params, ids, 6)),
                               np.asarray(gen.prompt_logits(params, ids, 6, mesh=mesh)), atol=1e-4)


def test_one_compilation_per_datastore_bucket(params, gen):
    for n in (70, 90, 130):  # all in the 256-entry bucket
        gen.generate(params, ids_of(n, n), max_new_tokens=8, seed=n)
    assert gen._loop._cache_size() == 1 and gen._window._cache_size() == 1 and gen._encode._cache_size() == 1
