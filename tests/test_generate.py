"""Sampling with the KV cache: greedy parity with transformers, sampling rules, stops, no re-trace."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.infer.generate import Generator, Sampling, sample_logits
from jaxlm.model import ModelConfig, forward, init_params

CFG = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  partial_rotary_factor=0.75, init_std=0.3)


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


@pytest.fixture(scope="module")
def greedy():
    return Generator(CFG, Sampling())


def test_greedy_matches_transformers_generate(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from hf_util import longrope_factors, phi3_model

    from jaxlm.convert.hf import load_hf

    short, long = longrope_factors(12)
    # original context 16: the decode crosses into the long factors, which forces a cache refill
    model, folder = phi3_model(tmp_path, max_position_embeddings=64, original_max_position_embeddings=16,
                               rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
                               tie_word_embeddings=True)
    cfg, params = load_hf(folder)
    rng = np.random.default_rng(0)
    prompts = [list(rng.integers(1, 320, 5)), list(rng.integers(1, 320, 11)), list(rng.integers(1, 320, 8))]
    ours = Generator(cfg).generate(params, prompts, max_new_tokens=20).tokens
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert ours == ref[:, width:].tolist()


def test_cached_decoding_equals_full_forward(params, greedy):
    prompt = [5, 17, 99, 3]
    out = greedy.generate(params, [prompt], max_new_tokens=12).tokens[0]
    seq = list(prompt)
    for _ in range(12):  # greedy without a cache: re-run the whole (causal, so right-padded) sequence
        buf = jnp.asarray([seq + [0] * (16 - len(seq))])
        seq.append(int(jnp.argmax(forward(CFG, params, buf)[0, len(seq) - 1])))
    assert out == seq[len(prompt):]


def test_batch_rows_equal_single_rows(params, greedy):
    prompts = [[1, 2, 3], [9, 8, 7, 6, 5, 4, 3, 2], [42]]
    batched = greedy.generate(params, prompts, max_new_tokens=10).tokens
    for p, row in zip(prompts, batched):
        assert greedy.generate(params, [p], max_new_tokens=10).tokens[0] == row


def test_stop_tokens_end_rows(params, greedy):
    prompts = [[1, 2, 3], [7, 7]]
    free = greedy.generate(params, prompts, max_new_tokens=10).tokens
    stop = free[0][3]
    out = greedy.generate(params, prompts, max_new_tokens=10, stop_tokens=[stop])
    assert out.tokens[0] == free[0][: free[0].index(stop) + 1] and out.finished[0]
    if stop in free[1]:
        assert out.tokens[1] == free[1][: free[1].index(stop) + 1]
    else:
        assert out.tokens[1] == free[1] and not out.finished[1]


def test_one_compilation_for_many_prompts(params):
    gen = Generator(CFG, Sampling(temperature=0.7, top_k=20))
    for n in (3, 5, 9, 12):  # all inside the 16-token prompt bucket
        gen.generate(params, [list(range(1, n + 1))], max_new_tokens=6, seed=n)
    assert gen.prefill._cache_size() == 1
    assert gen.loop._cache_size() == 1


def test_sampling_follows_the_softmax():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 20000)
    draw = jax.jit(jax.vmap(lambda k, s=None: sample_logits(logits, k, Sampling(temperature=1.0))[0]))
    freq = np.bincount(np.asarray(draw(keys)), minlength=4) / 20000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    # temperature 0.5 sharpens: p ~ p^2
    draw = jax.jit(jax.vmap(lambda k: sample_logits(logits, k, Sampling(temperature=0.5))[0]))
    freq = np.bincount(np.asarray(draw(keys)), minlength=4) / 20000
    p2 = np.array([0.25, 0.09, 0.0225, 0.0025])
    np.testing.assert_allclose(freq, p2 / p2.sum(), atol=0.015)


def test_top_k_and_top_p_truncate():
    logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
    keys = jax.random.split(jax.random.key(1), 5000)

    def draws(s):
        return np.asarray(jax.jit(jax.vmap(lambda k: sample_logits(logits, k, s)[0]))(keys))

    k2 = np.bincount(draws(Sampling(temperature=1.0, top_k=2)), minlength=4) / 5000
    assert k2[2:].sum() == 0 and abs(k2[0] - 4 / 7) < 0.03
    p = np.bincount(draws(Sampling(temperature=1.0, top_p=0.65)), minlength=4) / 5000  # 0.4 + 0.3 reaches it
    assert p[2:].sum() == 0 and abs(p[0] - 4 / 7) < 0.03
    assert set(draws(Sampling(temperature=1.0, top_p=0.01))) == {0}
    assert set(draws(Sampling(temperature=1.0, top_k=1))) == {0}


def test_sampling_rejects_bad_settings():
    with pytest.raises(ValueError, match="top_p"):
        Sampling(temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="temperature"):
        Sampling(temperature=-1.0)
