"""A checkpoint written on one mesh, read on another: a training checkpoint saved from an 8-device FSDP
mesh is restored (params only) onto 1 device and onto 2 devices with other layouts, gives the same
logits, is evaluated by `jaxlm eval` on a mesh chosen with --config.parallel.* overrides, and converts
to a Hugging Face folder."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import checkpoint, parallel
from jaxlm import config as run_config
from jaxlm.cli import main
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.model import forward
from jaxlm.train.loop import make_trainer, params_shardings


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A training checkpoint (params, optimizer state, config, tokenizer) from a (1, 8, 1) mesh."""
    cfg = tiny_config()
    cfg.parallel.update(data=1, fsdp=8)
    model_cfg = run_config.build(cfg).model
    mesh = parallel.make_mesh(cfg.parallel)
    state = make_trainer(model_cfg, run_config.build(cfg), mesh).init_state()
    emb = state.params["embedding"]
    assert len(emb.sharding.device_set) == 8 and emb.addressable_shards[0].data.size * 8 == emb.size
    tok = load_tokenizer(cfg.data.tokenizer)
    path = tmp_path_factory.mktemp("ckpt") / "checkpoints"
    ck = checkpoint.Checkpointer(path, async_save=False)
    ck.save(1, state, config=run_config.to_dict(cfg), tokenizer=tok.spec())
    ck.close()
    return path, cfg, model_cfg, checkpoint.to_numpy(state.params), tok


TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 2000, (2, 24)), jnp.int32)


@pytest.mark.parametrize("n, shape", [(1, (1, 1, 1)), (2, (1, 2, 1)), (2, (1, 1, 2)), (2, (2, 1, 1))],
                         ids=["1dev", "2dev-fsdp", "2dev-tensor", "2dev-data"])
def test_restore_onto_a_smaller_mesh(saved, n, shape):
    path, cfg, model_cfg, want, _ = saved
    devices = jax.devices()[:n]
    mesh = parallel.make_mesh(dict(zip(parallel.MESH_AXES, shape)), devices=devices)
    params = checkpoint.load_params(path, params_shardings(model_cfg, mesh, cfg.parallel.rules))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert a.sharding.device_set == set(devices)
        np.testing.assert_array_equal(np.asarray(a), b)
    if shape == (1, 1, 2):  # laid out as the rules say for this mesh, not as it was written
        q = params["layers"]["attn"]["q"]  # (layers, embed, heads, head_dim): heads split in two
        assert q.addressable_shards[0].data.shape == (q.shape[0], q.shape[1], q.shape[2] // 2, q.shape[3])
    with parallel.sharding_context(mesh, cfg.parallel.rules):
        got = jax.jit(lambda p, t: forward(model_cfg, p, t))(params, TOKENS)
    ref = forward(model_cfg, jax.tree.map(jnp.asarray, want), TOKENS)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_eval_cli_chooses_its_own_mesh(saved, tmp_path, capsys):
    path, cfg, model_cfg, want, tok = saved
    rng = np.random.default_rng(1)
    words = "to be or not that is the question whether tis nobler in mind".split()
    docs = [" ".join(rng.choice(words, rng.integers(3, 20))) for _ in range(6)]
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    out = tmp_path / "res.jsonl"
    # saved on (1, 8, 1); evaluated on (2, 2, 2) -- tensor parallelism the checkpoint never had
    assert main(["eval", "--checkpoint", str(path), "--data", str(data), "--out", str(out),
                 "--config.parallel.data=2", "--config.parallel.fsdp=2", "--config.parallel.tensor=2"]) == 0
    res = json.loads(out.read_text())
    nll = count = 0
    params = jax.tree.map(jnp.asarray, want)
    for t in docs:  # each document alone
        ids = tok.encode(t) + [tok.eos_id]
        lp = jax.nn.log_softmax(forward(model_cfg, params, jnp.asarray([ids[:-1]]))[0], -1)
        nll -= float(lp[jnp.arange(len(ids) - 1), jnp.asarray(ids[1:])].sum())
        count += len(ids) - 1
    assert res["tokens"] == count
    assert abs(res["loss"] - nll / count) < 1e-4

    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(path), "--data", str(data), "--config.parallel.fsdp=3"]) == 2
    assert "parallel" in capsys.readouterr().err


def test_convert_to_hf_from_a_sharded_checkpoint(saved, tmp_path):
    from jaxlm.convert.hf import load_hf

    path, _, model_cfg, want, _ = saved
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", "--checkpoint", str(path), "--out", str(out)]) == 0
    cfg2, params = load_hf(out)
    assert cfg2.num_layers == model_cfg.num_layers and cfg2.hidden_size == model_cfg.hidden_size
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), b)
