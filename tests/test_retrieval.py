"""Retrieval attention (Unlimiformer): equals full attention when it can (with a chat-like prefix, with
q/k/v biases), folding, search, blocked local attention, chunked prefill, sharded datastore, one
compilation, the memory cap and unreadable long inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError, DataError
from jaxlm.infer.generate import Generator
from jaxlm.infer.retrieval import LongGenerator, chunk_windows, position_plan, read_long_input, store_size
from jaxlm.model import Decoder, ModelConfig, forward, init_params
from jaxlm.model.config import AttentionConfig, RetrievalConfig
from jaxlm.model.ops import attend, attention_mask
from jaxlm.model.retrieval import fold_queries, local_attention, search


def config(qkv_bias=False, **retrieval):
    r = RetrievalConfig(**{**dict(layers=(0, 1), top_k=64, window=8, overlap=16, context=64), **retrieval})
    return ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, partial_rotary_factor=0.75, init_std=0.3, max_position_embeddings=64,
                       qkv_bias=qkv_bias, attention=AttentionConfig(impl="retrieval", retrieval=r))


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
    assert out.exact_positions and out.windows == 1 and out.datastore_entries == 32
    assert out.tokens == Generator(CFG).generate(params, [ids], max_new_tokens=8).tokens
    assert out.tokens == gen.generate_dense(params, ids, max_new_tokens=8).tokens


def test_a_span_with_a_local_prefix_is_full_attention():
    """A chat turn: prefix [0, 5) and suffix [30, 40) local, the input [5, 30) searchable; with q/k/v
    biases (Qwen2), which the retrieved keys and values must include."""
    cfg = config(qkv_bias=True)
    params = init_params(cfg, jax.random.key(3))
    params = jax.tree_util.tree_map_with_path(  # non-zero biases, so that leaving one out shows
        lambda p, x: x + 0.5 if "bias" in jax.tree_util.keystr(p) else x, params)
    gen = LongGenerator(cfg)
    ids = ids_of(40, 7)
    logits = gen.prompt_logits(params, ids, max_new_tokens=8, span=(5, 30))
    full = forward(cfg, params, jnp.asarray([ids]))[0, 30:]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(full), atol=1e-4, rtol=1e-4)
    out = gen.generate(params, ids, max_new_tokens=8, span=(5, 30))
    assert out.datastore_entries == 25
    assert out.tokens == Generator(cfg).generate(params, [ids], max_new_tokens=8).tokens


def test_local_attention_in_blocks_equals_attend():
    rng = np.random.default_rng(4)
    b, t, hq, hkv, d = 2, 100, 4, 2, 8
    q = jnp.asarray(rng.normal(size=(b, t, hq, d)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(b, 140, hkv, d)), jnp.float32)  # a cache: 40 slots before the queries
    v = jnp.asarray(rng.normal(size=(b, 140, hkv, d)), jnp.float32)
    seg = np.ones((b, 140), np.int32)
    seg[0, :50] = 0  # left padding in row 0
    seg = jnp.asarray(seg)
    for start in (40, 20):  # the queries fill the cache's last slots, or stop before them
        mask = attention_mask(jnp.arange(start, start + t), jnp.arange(140), seg[:, start:start + t], seg)
        np.testing.assert_allclose(np.asarray(local_attention(q, k, v, mask, block=48)),
                                   np.asarray(attend(q, k, v, mask)), atol=1e-5)
    mask = attention_mask(jnp.arange(t), jnp.arange(t), seg[:, :t], seg[:, :t])  # no cache
    np.testing.assert_allclose(np.asarray(local_attention(q, k[:, :t], v[:, :t], mask, block=32)),
                               np.asarray(attend(q, k[:, :t], v[:, :t], mask)), atol=1e-5)


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
    pos, start, exact = position_plan(40, (0, 32), 8, 64)
    assert exact and start == 32 and pos.tolist() == list(range(40))
    pos, start, exact = position_plan(1000, (0, 992), 8, 64)  # P = 64 - 8 - 8 = 48
    assert not exact and start == 48 and pos[0] == 0 and pos[991] == 47
    assert np.all(np.diff(pos[:992]) >= 0) and pos[-1] + 8 == 63  # generated tokens end at C - 1
    pos, start, exact = position_plan(1000, (5, 990), 8, 64)  # prefix 5, suffix 10: P = 64 - 15 - 8 = 41
    assert pos[:5].tolist() == list(range(5)) and pos[5] == 5 and pos[989] == 45 and start == 46
    assert pos[990:].tolist() == list(range(46, 56)) and pos[-1] + 8 == 63
    with pytest.raises(ConfigError, match="no positions are left"):
        position_plan(1000, (0, 950), 20, 64)


def test_store_sizes():
    assert [store_size(n, 16) for n in (1, 300, 4096, 4097, 65536, 65600)] == [256, 512, 4096, 8192, 65536, 69632]
    assert store_size(300, 16, multiple=3) == 513


def test_datastore_is_the_forward_attention_inputs(params):
    collect = jax.jit(lambda p, t: Decoder(CFG, collect=True).apply({"params": p}, t, return_hidden=True)[1])
    gen = LongGenerator(CFG, encode_batch=2)  # two windows per encoder call: the 4 below take 2 calls
    ids = ids_of(50, 3)
    rctx, info = gen.datastore(params, ids, max_new_tokens=4)
    collected = collect(params, jnp.asarray([ids]))
    np.testing.assert_allclose(np.asarray(rctx["h"][:, 0, :42]), np.asarray(collected[:, 0, :42]), atol=1e-5)
    assert np.asarray(rctx["valid"][0]).tolist()[:50] == [True] * 42 + [False] * 8  # the window is local
    # a long input: window 2 (reads [96, 160), keeps [112, 160)) is encoded from its own tokens
    ids = ids_of(200, 4)
    rctx, info = gen.datastore(params, ids, max_new_tokens=4)
    assert info["windows"] == 4 and not info["exact"]  # [0, 192) searchable: 64 + 3 x 48 >= 192
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


def test_one_compilation_per_datastore_bucket(params):
    gen = LongGenerator(CFG)
    for n in (90, 100, 110):  # all in the 256-entry bucket, two windows each
        gen.generate(params, ids_of(n, n), max_new_tokens=8, seed=n)
    assert gen.loop._cache_size() == 1 and gen.window._cache_size() == 1 and gen.encode._cache_size() == 1


def test_datastore_over_the_memory_cap_is_refused(params):
    gen = LongGenerator(config(max_datastore_mib=0.1))  # 2 layers x 512 rows x 64 x 4 B = 0.25 MiB
    with pytest.raises(ConfigError, match=r"needs a 0 MiB datastore, more than model.attention.retrieval.max_datastore_mib=0.1"):
        gen.generate(params, ids_of(300), max_new_tokens=2)


def test_unreadable_long_inputs_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text(" \n\t\n")
    (tmp_path / "model.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    for name, msg in (("empty.txt", "is empty"), ("model.bin", "is a binary file"), ("latin1.txt", "not UTF-8"),
                      ("missing.txt", "cannot read")):
        with pytest.raises(DataError, match=msg):
            read_long_input(tmp_path / name)
