"""Sharded training on 8 fake CPU devices equals one device; params are sharded as the rules say."""

import jax
import numpy as np
import pytest
from conftest import tiny_config
from jax.sharding import PartitionSpec as P

from jaxlm import config as run_config
from jaxlm import parallel
from jaxlm.data.pipeline import TrainData
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.model.config import ConfigError
from jaxlm.train.loop import make_trainer

KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_config(warmup_steps=1)
    cfg.model.update(num_heads=4, num_kv_heads=2, tie_embeddings=False)
    run = run_config.build(cfg)
    data = TrainData(run.data, run.data.train, load_tokenizer(run.data.tokenizer), run.train.batch_size, 1, 0)
    it = data.iterator()
    batches = [{k: v for k, v in next(it).items() if k in KEYS} for _ in range(3)]
    return cfg, batches


def run(cfg, batches, mesh):
    tr = make_trainer(run_config.build(cfg).model, run_config.build(cfg), mesh)
    state = tr.init_state()
    losses = []
    for b in batches:
        state, m = tr(state, b)
        losses.append(float(m["loss"]))
    return losses, state


@pytest.fixture(scope="module")
def single(setup):
    cfg, batches = setup
    return run(cfg, batches, parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_sharded_losses_equal_one_device(setup, single, shape):
    cfg, batches = setup
    mesh = parallel.make_mesh(dict(zip(("data", "fsdp", "tensor"), shape)))
    losses, state = run(cfg, batches, mesh)
    np.testing.assert_allclose(losses, single[0], rtol=2e-5)
    assert losses[-1] < losses[0]
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(single[1].params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=5e-5)
    if shape == (2, 2, 2):
        check_shardings(state)


def check_shardings(state):
    """Params (and Adam's moments) are sharded as DEFAULT_RULES say on a (2, 2, 2) mesh."""
    p = state.params
    assert p["embedding"].sharding.spec == P("tensor", "fsdp")          # (vocab, embed)
    assert p["lm_head"].sharding.spec == P("fsdp", "tensor")            # (embed, vocab)
    assert p["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["layers"]["attn"]["k"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert p["layers"]["attn"]["o"].sharding.spec == P(None, "tensor", None, "fsdp")
    assert p["layers"]["mlp"]["wi"].sharding.spec == P(None, "fsdp", None, "tensor")
    assert p["layers"]["mlp_norm"]["scale"].sharding.spec == P(None, "fsdp")
    q = p["layers"]["attn"]["q"]
    assert q.addressable_shards[0].data.size * 4 == q.size  # fsdp (2) x tensor (2)
    adam = state.opt_state[1][0]  # chain(clip, adamw = chain(scale_by_adam, ...))
    assert adam.mu["layers"]["attn"]["q"].sharding.spec == P(None, "fsdp", "tensor", None)
    assert adam.nu["embedding"].sharding.spec == P("tensor", "fsdp")




def test_initialize_is_a_no_op_for_one_process(monkeypatch):
    for k in ("JAXLM_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(k, raising=False)
    assert parallel.initialize() is False
    with pytest.raises(ConfigError, match="needs all of parallel.coordinator_address"):
        parallel.initialize("127.0.0.1:1234", None, None)
