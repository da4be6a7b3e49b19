"""LoRA in the one trainer: adapter-only steps (the base bit for bit, optimizer state for the adapters
alone), DPO with `align.reference=adapters_off` equal to DPO with an explicit frozen copy, and
`jaxlm train` / `jaxlm align` with --config.model.lora.* end to end: adapter-only checkpoints that
resume, and a clear error when their base has changed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_losses, tiny_config, write_config

from jaxlm import checkpoint, parallel
from jaxlm import config as run_config
from jaxlm.align.data import PrefConfig, load_pairs, make_rows
from jaxlm.align.train import make_loss_fn
from jaxlm.cli import main
from jaxlm.data.pipeline import TrainData
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.model import lora
from jaxlm.train.loop import make_trainer

TOK = "asset:tiny_bpe.json"


def lora_config(tmp_path=None, **train):
    cfg = tiny_config(tmp_path, **{"warmup_steps": 0, "lr": 3e-3, **train})
    cfg.model.lora.update(rank=4, alpha=8.0)
    return cfg


def bits(tree) -> list[bytes]:
    return [np.asarray(x).tobytes() for x in jax.tree.leaves(tree)]


def state_size(opt_state) -> int:
    """Array elements in an optimizer state (scalars such as Adam's count left out)."""
    return sum(x.size for x in jax.tree.leaves(opt_state) if hasattr(x, "ndim") and x.ndim)


def test_lora_steps_train_only_the_adapters(capsys):
    cfg = lora_config(weight_decay=0.1)  # weight decay must not touch the frozen base either
    built = run_config.build(cfg)
    data = TrainData(built.data, built.data.train, load_tokenizer(built.data.tokenizer), built.train.batch_size, 1, 0)
    it = data.iterator()
    keys = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
    mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, devices=jax.devices()[:1])
    tr = make_trainer(built.model, built, mesh)
    s = s0 = tr.init_state()
    before = jax.device_get(s0.params)
    losses = []
    for _ in range(3):
        s, m = tr(s, {k: v for k, v in next(it).items() if k in keys})
        losses.append(float(m["loss"]))
    after = jax.device_get(s.params)
    base0, ad0 = lora.split(before)
    base1, ad1 = lora.split(after)
    assert bits(base1) == bits(base0)  # the base is bitwise unchanged
    assert all(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ad1), jax.tree.leaves(ad0)))
    assert losses[-1] < losses[0]

    # only the adapters have Adam moments: optimizer state = 2 x adapter params
    n_adapter = lora.count(after)
    n_total = sum(x.size for x in jax.tree.leaves(after))
    assert state_size(s.opt_state) == 2 * n_adapter
    full_cfg = built.replace(model=lora.off(built.model))
    full = make_trainer(full_cfg.model, full_cfg, mesh, tx=None)
    full_state = full.init_state()
    n_base = sum(x.size for x in jax.tree.leaves(full_state.params))
    assert n_base == n_total - n_adapter and state_size(full_state.opt_state) == 2 * n_base
    ratio = state_size(s.opt_state) / state_size(full_state.opt_state)
    assert ratio == pytest.approx(n_adapter / n_base) and ratio < 0.1
    with capsys.disabled():
        print(f"\n[lora] optimizer state LoRA r=4 / full fine-tuning = {ratio:.4f} "
              f"({n_adapter} of {n_base} params train)")


def write_pairs(path, n, seed):
    rng = np.random.default_rng(seed)
    good, bad, topic = "sun moon star light".split(), "rock stone dust mud".split(), "king sea ship night".split()
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": " ".join(rng.choice(topic, 3)) + " ?",
                                "chosen": " " + " ".join(rng.choice(good, rng.integers(2, 6))),
                                "rejected": " " + " ".join(rng.choice(bad, rng.integers(2, 6)))}) + "\n")
    return path


def test_adapters_off_reference_equals_an_explicit_frozen_copy(tmp_path):
    """The same loss, metrics and gradients as DPO whose reference is a separate frozen copy of the
    base (what align.reference=checkpoint holds: the base plus B = 0 adapters)."""
    cfg = lora_config()
    cfg.align.update(loss="dpo", beta=0.5)
    model_cfg = run_config.build(cfg).model
    from test_lora import randomized  # params whose adapters are all non-zero

    params = randomized(model_cfg, seed=2)
    frozen = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if lora.is_adapter(p) else jnp.array(x, copy=True), params)
    pairs = load_pairs(PrefConfig(str(write_pairs(tmp_path / "p.jsonl", 6, 0)), 48, 24), load_tokenizer(TOK))
    rows = make_rows(pairs, np.arange(6), 48)
    batch = {k: jnp.asarray(rows[k]) for k in ("tokens", "targets", "loss_mask", "segment_ids", "positions",
                                                "lengths")}
    out = {}
    for mode, ref in (("adapters_off", None), ("checkpoint", frozen)):
        cfg.align.reference = mode
        f = make_loss_fn(model_cfg, run_config.build(cfg).align, 16)

        def loss(p, f=f, ref=ref):
            total, _, aux = f(p, batch, ref)
            return total, aux
        (total, aux), grads = jax.value_and_grad(loss, has_aux=True)(params)
        out[mode] = total, aux, grads
    (la, aa, ga), (lb, ab, gb) = out["adapters_off"], out["checkpoint"]
    assert float(la) == pytest.approx(float(lb), abs=1e-6) and abs(float(la) / 6 - np.log(2)) > 1e-3
    for k in aa:
        assert float(aa[k]) == pytest.approx(float(ab[k]), abs=1e-5), k
    for x, y in zip(jax.tree.leaves(ga), jax.tree.leaves(gb)):
        np.testing.assert_allclose(x, y, atol=1e-6, rtol=0)


def _ckpt_bytes(path):
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


@pytest.mark.slow  # four short training runs in process (about a minute of CPU)
def test_train_and_align_with_lora_from_the_command_line(tmp_path, capsys):
    """`jaxlm train --init BASE --config.model.lora.*` writes adapter-only checkpoints that resume;
    `jaxlm align --config.align.reference=adapters_off` starts at exactly log 2 (the reference is the
    policy's own base); a changed base is refused by name."""
    base_cfg = tiny_config(tmp_path / "base", steps=2)
    assert main(["train", "--config", str(write_config(base_cfg, tmp_path / "base.py"))]) == 0
    base_ckpt = tmp_path / "base" / "run" / "checkpoints"
    base_params = checkpoint.load_params(base_ckpt)

    lora_cfg = write_config(tiny_config(tmp_path / "lora", steps=3, warmup_steps=0), tmp_path / "lora.py")
    argv = ["train", "--config", str(lora_cfg), "--init", str(base_ckpt), "--config.model.lora.rank=4",
            "--config.model.lora.alpha=8", "--config.model.lora.adapters=('mine',)"]
    assert main(argv) == 0
    run = tmp_path / "lora" / "run"
    ref = checkpoint.adapter_base(run / "checkpoints")
    assert ref["checkpoint"] == str(base_ckpt / "2")
    full = checkpoint.load_params(run / "checkpoints")
    assert bits(lora.split(full)[0]) == bits(base_params) and lora.count(full) > 0
    assert json.loads(json.dumps(checkpoint.load_config(run / "checkpoints")["model"]["lora"]["adapters"])) == ["mine"]
    # the checkpoint's params hold the adapters alone: a small fraction of the base's bytes
    ad_bytes, base_bytes = _ckpt_bytes(run / "checkpoints" / "3" / "params"), _ckpt_bytes(base_ckpt / "2" / "params")
    assert ad_bytes < 0.3 * base_bytes, (ad_bytes, base_bytes)

    assert main(argv + ["--resume", "--config.train.steps=5"]) == 0  # continues from step 3, base joined back
    assert sorted(read_losses(run / "metrics.jsonl")) == [1, 2, 3, 4, 5]
    assert bits(lora.split(checkpoint.load_params(run / "checkpoints"))[0]) == bits(base_params)
    capsys.readouterr()
    gen = ["generate", "--checkpoint", str(run / "checkpoints"), "--prompt", "To be", "--max-new-tokens", "3", "--no-stop"]
    assert main(gen + ["--adapter", "mine"]) == 0 and "decode 3 tokens" in capsys.readouterr().err
    assert main(gen + ["--adapter", "nope"]) == 2
    assert "adapter 'nope' is not one of the model's adapters ('mine',)" in capsys.readouterr().err.replace("\n", "")

    # preference training of adapters against the same weights with adapters off
    a_cfg = lora_config(tmp_path / "align", steps=2, batch_size=4)
    a_cfg.data.update(train=str(write_pairs(tmp_path / "train.jsonl", 32, 1)), eval="", seq_len=48)
    a_cfg.align.update(loss="dpo", beta=0.5, max_prompt_length=24)
    a_file = write_config(a_cfg, tmp_path / "align.py")
    assert main(["align", "--config", str(a_file), "--init", str(base_ckpt),
                 "--config.align.reference=adapters_off"]) == 0
    losses = read_losses(tmp_path / "align" / "run" / "metrics.jsonl")
    assert losses[1] == pytest.approx(np.log(2), abs=1e-6)  # fresh adapters (B = 0): policy == reference
    assert checkpoint.adapter_base(tmp_path / "align" / "run" / "checkpoints")["checkpoint"] == str(base_ckpt / "2")

    capsys.readouterr()
    assert main(["align", "--config", str(a_file), "--config.model.lora.rank=0", "--config.log.dir=" + str(tmp_path / "x"),
                 "--config.align.reference=adapters_off"]) != 0
    assert "align.reference=adapters_off needs a policy with LoRA adapters" in capsys.readouterr().err

    # the base changes after the adapters were saved: refused, naming the base
    meta = base_ckpt / "2" / "meta" / "metadata"
    m = json.loads(meta.read_text())
    m["fingerprints"]["params"] = {k: 0 for k in m["fingerprints"]["params"]}
    meta.write_text(json.dumps(m))
    with pytest.raises(checkpoint.BaseCheckpointError, match=r"base checkpoint .*base/run/checkpoints/2 cannot be "
                       r"used: it has changed since the adapters were saved"):
        checkpoint.load_params(run / "checkpoints")
