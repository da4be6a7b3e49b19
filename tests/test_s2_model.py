"""S2-Attention in the model: dense equivalence, hybrid layers, training, and compressed-cache decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as run_config
from jaxlm.infer.generate import Generator
from jaxlm.model import ModelConfig, cache_bytes, forward, init_params
from jaxlm.model import s2 as model_s2
from jaxlm.model.config import AttentionConfig, S2Config

BASE = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=3, num_heads=4, num_kv_heads=2,
                   init_std=0.3)


def with_s2(cfg=BASE, **kw):
    return cfg.replace(attention=AttentionConfig(impl="s2", s2=S2Config(**{"kernel": "xla", **kw})))


@pytest.fixture(scope="module")
def params():
    return init_params(BASE, jax.random.key(0))


def test_all_dense_pattern_equals_dense_model(params):
    toks = jnp.asarray(np.random.default_rng(0).integers(0, 128, (2, 70)))
    dense = forward(BASE, params, toks)
    s2 = forward(with_s2(block_size=16, local_blocks=8, vert_stride=4), params, toks)  # 8 blocks cover T=70
    assert float(jnp.abs(s2 - dense).max()) < 1e-5 * float(jnp.abs(dense).max()) + 1e-4
    sparse = forward(with_s2(block_size=16, local_blocks=1, vert_stride=3), params, toks)
    assert float(jnp.abs(sparse - dense)[:, 16:].max()) > 1e-2  # the sparse pattern really is sparse
    np.testing.assert_allclose(sparse[:, :16], dense[:, :16], atol=1e-4)  # the first block is all local


def test_dense_layers_of_a_hybrid_model():
    assert model_s2.dense_layers(with_s2(BASE.replace(num_layers=4), dense_every_n=2)) == (1, 3)
    assert model_s2.dense_layers(with_s2(BASE.replace(num_layers=4), dense_layers=(0,), dense_every_n=2)) == (0, 1, 3)


@pytest.mark.parametrize("dense_layers", [(), (1,)], ids=["all_sparse", "hybrid"])
def test_compressed_cache_decodes_like_the_full_cache(params, dense_layers):
    cfg = with_s2(block_size=16, local_blocks=1, vert_stride=3, dense_layers=dense_layers)
    full = Generator(with_s2(block_size=16, local_blocks=1, vert_stride=3, dense_layers=dense_layers,
                             compressed_cache=False))
    prompts = [list(range(1, 40)), list(range(5, 20)), [7, 9]]  # left-padded to different lengths
    a = full.generate(params, prompts, max_new_tokens=60).tokens
    b = Generator(cfg).generate(params, prompts, max_new_tokens=60).tokens
    assert a == b
    # the compressed cache holds ~local_blocks + i / vert_stride blocks instead of i
    per_layer = model_s2.layer_cache_bytes(cfg, 1, 4096)
    full_bytes = 2 * 4096 * 2 * 16 * 4
    for layer, kind, n in per_layer:
        assert kind == ("dense" if layer in dense_layers else "s2")
        assert n == full_bytes if kind == "dense" else n < full_bytes / 2.5
    assert cache_bytes(cfg, 1, 4096) == sum(n for _, _, n in per_layer)


def test_cached_decoding_equals_the_kernel_forward(params):
    cfg = with_s2(block_size=16, local_blocks=2, vert_stride=2, dense_layers=(2,))
    prompt = list(range(3, 30))
    out = Generator(cfg).generate(params, [prompt], max_new_tokens=40).tokens[0]
    seq = list(prompt)
    for _ in range(40):
        buf = jnp.asarray([seq + [0] * (80 - len(seq))])
        seq.append(int(jnp.argmax(forward(cfg, params, buf)[0, len(seq) - 1])))
    assert out == seq[len(prompt):]


def test_an_s2_model_trains_like_the_dense_one(tmp_path):
    from conftest import read_losses

    from jaxlm.train.loop import train

    losses = {}
    for impl in ("dense", "s2"):
        cfg = tiny_config(tmp_path / impl, steps=16, lr=3e-3, warmup_steps=0)
        cfg.data.eval = ""
        cfg.model.attention.impl = impl
        cfg.model.attention.s2.update(block_size=16, local_blocks=1, vert_stride=2, kernel="xla")
        train(cfg)
        losses[impl] = read_losses(tmp_path / impl / "run" / "metrics.jsonl")
    d, s = losses["dense"], losses["s2"]
    first, last = np.mean([s[i] for i in (1, 2)]), np.mean([s[i] for i in (15, 16)])
    assert last < first - 0.8, (first, last)
    assert abs(last - np.mean([d[i] for i in (15, 16)])) < 0.1 * last  # falls like the dense model's
    assert run_config.build(cfg).model.attention.impl == "s2"
