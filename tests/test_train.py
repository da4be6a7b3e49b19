"""Steps, the optimizer and the loop on one device-mesh: losses, accumulation, masks, NaN stops."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import tiny_config

from jaxlm import config as run_config
from jaxlm import parallel
from jaxlm.data.pipeline import TrainData
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.model import ModelConfig, init_params
from jaxlm.pytree import path_str
from jaxlm.train import state as train_state
from jaxlm.train.loop import TrainingError, make_trainer, train
from jaxlm.train.steps import token_logprobs

CFG = ModelConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, num_kv_heads=1)


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_logprobs_equal_full_log_softmax(tied):
    cfg = CFG.replace(tie_embeddings=tied)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((2, 37, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 300, (2, 37)))
    w = params["embedding"].T if tied else params["lm_head"]
    full = jnp.take_along_axis(jax.nn.log_softmax(hidden @ w, -1), targets[..., None], -1)[..., 0]
    for chunk in (0, 8, 37, 64):
        np.testing.assert_allclose(token_logprobs(cfg, params, hidden, targets, chunk), full, atol=1e-5)
    # and its gradient
    g_full = jax.grad(lambda h: (jnp.take_along_axis(jax.nn.log_softmax(h @ w, -1), targets[..., None], -1)).sum())(hidden)
    g_chunk = jax.grad(lambda h: token_logprobs(cfg, params, h, targets, 8).sum())(hidden)
    np.testing.assert_allclose(g_chunk, g_full, atol=1e-5)


def test_schedule_warmup_then_cosine_to_floor():
    cfg = run_config.defaults()
    cfg.train.update(lr=1.0, warmup_steps=10, steps=110, min_lr_ratio=0.1)
    f = train_state.schedule(cfg.train)
    assert float(f(0)) == 0.0 and abs(float(f(5)) - 0.5) < 1e-6 and abs(float(f(10)) - 1.0) < 1e-6
    assert abs(float(f(60)) - (0.1 + 0.9 * 0.5)) < 1e-5 and abs(float(f(110)) - 0.1) < 1e-6
    cfg.train.schedule = "linear"
    assert abs(float(train_state.schedule(cfg.train)(60)) - 0.55) < 1e-6


def one_device_mesh():
    return parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])


def batches(cfg, n):
    cfg = run_config.build(cfg)
    data = TrainData(cfg.data, cfg.data.train, load_tokenizer(cfg.data.tokenizer), cfg.train.batch_size, 1, 0)
    it = data.iterator()
    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    return [{k: v for k, v in next(it).items() if k in keys} for _ in range(n)]


def test_gradient_accumulation_equals_one_big_batch():
    cfg = tiny_config(warmup_steps=0)
    mesh = one_device_mesh()
    (batch,) = batches(cfg, 1)
    one = make_trainer(run_config.build(cfg).model, run_config.build(cfg), mesh)
    s1, m1 = one(one.init_state(), batch)
    cfg.train.grad_accum = 4
    acc = make_trainer(run_config.build(cfg).model, run_config.build(cfg), mesh)
    s4, m4 = acc(acc.init_state(), batch)
    assert abs(float(m1["loss"]) - float(m4["loss"])) < 1e-6 and float(m1["tokens"]) == float(m4["tokens"])
    assert abs(float(m1["grad_norm"]) / float(m4["grad_norm"]) - 1) < 1e-5
    # Adam's first step is ~lr*sign(g): summation-order noise on near-zero gradients shows up at 1e-6
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s4.params)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    assert float(jnp.abs(s1.params["embedding"] - one.init_state().params["embedding"]).max()) > 1e-4


def test_trainable_mask_freezes_the_rest():
    cfg = tiny_config(warmup_steps=0)
    cfg.train.update(trainable="layers/attn/(q|v)", weight_decay=0.1)
    tr = make_trainer(run_config.build(cfg).model, run_config.build(cfg), one_device_mesh())
    s0 = tr.init_state()
    before = jax.device_get(s0.params)
    s1, _ = tr(s0, batches(cfg, 1)[0])
    after = jax.device_get(s1.params)
    changed = {path_str(p) for p, a in jax.tree_util.tree_leaves_with_path(after)
               if not np.array_equal(a, _at(before, p))}
    assert changed == {"layers/attn/q", "layers/attn/v"}
    # frozen parameters carry no Adam moments
    n_state = sum(x.size for x in jax.tree.leaves(s1.opt_state) if hasattr(x, "size") and x.ndim)
    n_train = after["layers"]["attn"]["q"].size + after["layers"]["attn"]["v"].size
    assert n_state == 2 * n_train


def _at(tree, path):
    for k in path:
        tree = tree[k.key]
    return tree


def test_loss_falls_and_metrics_are_logged(tmp_path):
    cfg = tiny_config(tmp_path, steps=30, lr=3e-3)
    cfg.data.eval = "asset:shakespeare/eval.jsonl"
    cfg.train.eval_every = 30
    out = train(cfg)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    train_rec = [r for r in lines if "lr" in r]
    assert [r["step"] for r in train_rec] == list(range(1, 31))
    first, last = np.mean([r["loss"] for r in train_rec[:3]]), np.mean([r["loss"] for r in train_rec[-3:]])
    assert last < first - 1.0, (first, last)
    logged = [r for r in train_rec if "mfu" in r]
    assert logged and all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in logged)
    assert out.eval["ppl"] < np.exp(first)


def test_non_finite_loss_stops_and_names_the_step(tmp_path):
    cfg = tiny_config(tmp_path, steps=6, lr=1e30, warmup_steps=0, clip_norm=0.0)
    cfg.checkpoint.every = 1
    with pytest.raises(TrainingError, match=r"non-finite loss or update at step (\d)") as e:
        train(cfg)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert bad >= 2 and f"last good checkpoint is step {bad - 1}" in str(e.value)
    saved = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == bad - 1  # the bad state was never written


def test_optimizer_skips_weight_decay_on_norms():
    params = {"layers": {"attn_norm": {"scale": jnp.ones((2, 4))}, "attn": {"q": jnp.ones((2, 4, 4))}}}
    cfg = run_config.defaults()
    cfg.train.update(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=0.0, schedule="constant")
    tx = train_state.optimizer(cfg.train)
    zeros = jax.tree.map(jnp.zeros_like, params)
    upd, _ = tx.update(zeros, tx.init(params), params)
    new = optax.apply_updates(params, upd)
    assert float(new["layers"]["attn_norm"]["scale"][0, 0]) == 1.0
    assert abs(float(new["layers"]["attn"]["q"][0, 0, 0]) - (1 - 0.1 * 0.5)) < 1e-6
