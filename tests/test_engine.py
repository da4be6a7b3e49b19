"""Continuous batching: the per-row KV cache, per-row sampling, and the engine's slots."""

import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.infer.engine import Engine, Finish, Request, Token
from jaxlm.infer.generate import Generator, Sampling, sample_rows
from jaxlm.model import Decoder, ModelConfig, forward, init_cache, init_params
from jaxlm.model.cache import insert_row
from jaxlm.model.config import AttentionConfig, S2Config

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  partial_rotary_factor=0.75, init_std=0.3, max_position_embeddings=256)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def engine(params):
    eng = Engine(CFG, params, slots=3, max_len=96).start()
    yield eng
    eng.close()


def test_per_row_cache_decodes_like_the_uncached_forward(params):
    """Rows prefilled alone, put in a cache at different lengths, then decoded together."""
    model = Decoder(CFG)
    seqs = [[5, 17, 99, 3, 8, 1, 2], [42, 7], [9, 8, 7, 6, 5]]
    cache = init_cache(CFG, 3, 32, per_row=True)
    assert cache["index"].shape == (3,)
    for r, s in enumerate(seqs):
        toks = np.zeros((1, 16), np.int32)
        toks[0, :len(s)] = s
        seg = (np.arange(16) < len(s)).astype(np.int32)[None]
        _, row = model.apply({"params": params}, toks, np.arange(16)[None], seg, cache=init_cache(CFG, 1, 16))
        cache = insert_row(cache, row, r, len(s))
    np.testing.assert_array_equal(cache["index"], [7, 2, 5])
    cont = np.random.default_rng(0).integers(1, 128, (3, 4)).astype(np.int32)
    for j in range(4):  # positions default to each row's own index
        logits, cache = model.apply({"params": params}, cont[:, j:j + 1], cache=cache)
        rows = [s + cont[r, :j + 1].tolist() for r, s in enumerate(seqs)]
        padded = jnp.asarray([row + [0] * (16 - len(row)) for row in rows])  # causal: right padding is harmless
        full = forward(CFG, params, padded)
        for r, row in enumerate(rows):
            np.testing.assert_allclose(logits[r, 0], full[r, len(row) - 1], atol=2e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache["index"], [11, 6, 9])


def test_sample_rows_gives_each_row_its_own_setting():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]] * 4))
    n = 4000
    keys = jax.random.split(jax.random.key(1), n)
    temperature = jnp.asarray([0.0, 1.0, 1.0, 1.0])
    top_k = jnp.asarray([0, 0, 2, 0])
    top_p = jnp.asarray([1.0, 1.0, 1.0, 0.65])
    draw = jax.jit(jax.vmap(lambda k: sample_rows(logits, jax.random.split(k, 4), temperature, top_k, top_p)))
    out = np.asarray(draw(keys))  # [n, 4]
    freq = [np.bincount(out[:, r], minlength=4) / n for r in range(4)]
    assert set(out[:, 0]) == {0}  # greedy
    np.testing.assert_allclose(freq[1], [0.4, 0.3, 0.2, 0.1], atol=0.03)
    assert freq[2][2:].sum() == 0 and abs(freq[2][0] - 4 / 7) < 0.03  # top-k 2
    assert freq[3][2:].sum() == 0 and abs(freq[3][0] - 4 / 7) < 0.03  # top-p 0.65 keeps 0.4 + 0.3
    # on a wide vocabulary: the exact truncated distribution of sample_logits' rule, row by row
    wide = np.asarray(jax.random.normal(jax.random.key(3), (3, 500))) * 2
    settings = [(1.0, 7, 1.0), (1.0, 0, 0.3), (0.5, 40, 0.8)]  # temperature, top_k, top_p
    t, k, tp = (jnp.asarray(c) for c in zip(*settings))
    draw = jax.jit(jax.vmap(lambda key: sample_rows(jnp.asarray(wide), jax.random.split(key, 3), t, k, tp)))
    out = np.asarray(draw(jax.random.split(jax.random.key(4), 4000)))
    for r, (temp, top_k, top_p) in enumerate(settings):
        order = np.argsort(-wide[r])
        keep = order[: top_k or 500]
        prob = np.exp(wide[r, keep] / temp - (wide[r, keep] / temp).max())
        prob /= prob.sum()
        n = int(np.sum(np.cumsum(prob) - prob < top_p))  # mass strictly before < top_p
        keep, prob = keep[:n], prob[:n] / prob[:n].sum()
        assert set(out[:, r]) <= set(keep.tolist())
        np.testing.assert_allclose(np.bincount(out[:, r], minlength=500)[keep] / 4000, prob, atol=0.025)


def test_engine_greedy_equals_generate(params, engine):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42], list(range(3, 30))]  # 4 requests, 3 slots
    ref = Generator(CFG).generate(params, prompts, max_new_tokens=10).tokens
    out = [None] * len(prompts)

    def run(i):
        out[i] = engine.complete(prompts[i], max_tokens=10, timeout=300)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert [t for t, _ in out] == ref
    assert all(r == "length" for _, r in out)


def test_staggered_requests_get_what_they_get_alone(engine):
    """Different temperatures, top-k/top-p and lengths, started at staggered times, n=2 in the mix."""
    reqs = [dict(prompt=[3, 4, 5], max_tokens=20, sampling=Sampling(0.8), seed=1),
            dict(prompt=list(range(10, 40)), max_tokens=6, sampling=Sampling(1.2, top_k=8), seed=2, n=2),
            dict(prompt=[77] * 5, max_tokens=14, sampling=Sampling(0.0), seed=3),
            dict(prompt=[1, 2], max_tokens=9, sampling=Sampling(1.0, top_p=0.7), seed=4)]
    alone = [engine.complete(r["prompt"], timeout=300, **{k: v for k, v in r.items() if k != "prompt"})
             for r in reqs]
    together = [None] * len(reqs)

    def run(i):
        time.sleep(0.15 * i)
        r = reqs[i]
        together[i] = engine.complete(r["prompt"], timeout=300, **{k: v for k, v in r.items() if k != "prompt"})

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(reqs))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == alone
    assert alone[1][0][0] != alone[1][1][0]  # the n choices differ (same seed, own streams)


def test_a_late_request_starts_before_the_running_ones_finish(engine):
    events = []
    lock = threading.Lock()

    def sink(name):
        def f(choice, ev):
            with lock:
                events.append((name, type(ev).__name__, time.perf_counter()))
        return f

    long = Request([5, 6, 7], 90, sink("long"))
    engine.submit(long)
    while sum(e[0] == "long" for e in events) < 5:  # mid-generation
        time.sleep(0.002)
    late = Request([8, 9], 3, sink("late"))
    engine.submit(late)
    deadline = time.time() + 300
    while sum(e[1] == "Finish" for e in events) < 2 and time.time() < deadline:
        time.sleep(0.02)
    first_late = next(i for i, e in enumerate(events) if e[0] == "late")
    long_end = next(i for i, e in enumerate(events) if e[0] == "long" and e[1] == "Finish")
    late_end = next(i for i, e in enumerate(events) if e[0] == "late" and e[1] == "Finish")
    assert first_late < long_end and late_end < long_end
    assert sum(e[0] == "long" and e[1] == "Token" for e in events) == 90


def test_cancel_frees_the_slot(engine):
    got = []
    req = Request([1, 2, 3], 80, lambda c, ev: got.append(ev))
    engine.submit(req)
    while not got:
        time.sleep(0.01)
    engine.cancel(req)
    deadline = time.time() + 60
    while not (got and isinstance(got[-1], Finish)) and time.time() < deadline:
        time.sleep(0.01)
    assert got[-1].reason == "cancelled" and sum(isinstance(e, Token) for e in got) < 80
    time.sleep(0.1)
    assert engine.busy == 0


def test_stop_tokens_and_echo_scores(params, engine):
    free = engine.complete([1, 2, 3], max_tokens=8)[0][0]
    stop = free[3]
    toks, reason = engine.complete([1, 2, 3], max_tokens=8, stop_ids=[stop])[0]
    assert toks == free[: free.index(stop) + 1] and reason == "stop"
    got = {}

    def sink(choice, ev):
        got.setdefault(type(ev).__name__, ev)

    prompt = [4, 50, 6, 70, 8]
    engine.submit(Request(prompt, 0, sink, echo_logprobs=2))
    deadline = time.time() + 60
    while "Finish" not in got and time.time() < deadline:
        time.sleep(0.01)
    lp = jax.nn.log_softmax(forward(CFG, params, jnp.asarray([prompt]))[0], axis=-1)
    want = [float(lp[t, prompt[t + 1]]) for t in range(len(prompt) - 1)]
    echo = got["PromptLogprobs"]
    assert echo.logprobs[0] is None and echo.top[0] is None
    np.testing.assert_allclose(echo.logprobs[1:], want, atol=1e-5)
    assert echo.top[1][0][0] == int(jnp.argmax(lp[0])) and got["Finish"].reason == "length"


def test_s2_compressed_cache_in_slots():
    cfg = CFG.replace(num_layers=3, attention=AttentionConfig(
        impl="s2", s2=S2Config(kernel="xla", block_size=16, local_blocks=1, vert_stride=3, dense_layers=(1,))))
    params = init_params(cfg, jax.random.key(1))
    prompts = [list(range(1, 40)), [7, 9]]
    ref = Generator(cfg).generate(params, prompts, max_new_tokens=24).tokens
    eng = Engine(cfg, params, slots=2, max_len=256)
    assert eng.compressed
    eng.start()
    try:
        out = [None, None]
        threads = [threading.Thread(target=lambda i=i: out.__setitem__(i, eng.complete(prompts[i], max_tokens=24)))
                   for i in range(2)]
        [t.start() for t in threads]
        [t.join() for t in threads]
    finally:
        eng.close()
    assert [o[0][0] for o in out] == ref


def test_warmup_compiles_every_bucket_once(params):
    eng = Engine(CFG, params, slots=2, max_len=64)
    eng.warmup(max_prompt=20)
    sizes = (eng._prefill_fn._cache_size(), eng._admit_fn._cache_size(), eng._decode_fn._cache_size())
    assert sizes == (4, 2, 4)  # prompt buckets 16, 32 (with and without echo); rows 1, 2 x lengths 32, 64
    eng.start()
    try:
        for p in ([1, 2, 3], list(range(1, 21))):
            eng.complete(p, max_tokens=30, n=2, sampling=Sampling(0.5))
    finally:
        eng.close()
    assert (eng._prefill_fn._cache_size(), eng._admit_fn._cache_size(), eng._decode_fn._cache_size()) == sizes


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(engine):
    real = engine._decode_fn
    calls = []

    def broken(*a, **k):
        calls.append(1)
        engine._decode_fn = real
        raise RuntimeError("boom")

    engine._decode_fn = broken
    try:
        out = engine.complete([1, 2, 3], max_tokens=5, n=2, timeout=120)
    finally:
        engine._decode_fn = real
    assert calls and [r for _, r in out] == ["error", "error"]
    assert engine.complete([1, 2, 3], max_tokens=5, timeout=120)[0][1] == "length"
