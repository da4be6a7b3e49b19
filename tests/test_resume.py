"""Checkpoints: exact resumption after `kill -9`, and falling back past a corrupt checkpoint."""

import logging
import os
import shutil
import signal
import subprocess
import sys

from conftest import read_losses, run_until_step, tiny_config, write_config

from jaxlm.train.loop import train


def jaxlm(*args):
    return [sys.executable, "-m", "jaxlm.cli", *map(str, args)]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    cfg = tiny_config(tmp_path / "ref", steps=10)
    cfg.checkpoint.update(every=3, async_save=True)
    train(cfg)
    want = read_losses(tmp_path / "ref" / "run" / "metrics.jsonl")

    cfg.log.dir = str(tmp_path / "killed")
    conf = write_config(cfg, tmp_path / "cfg.py")
    metrics = tmp_path / "killed" / "metrics.jsonl"
    proc = subprocess.Popen(jaxlm("train", "--config", conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    run_until_step(proc, metrics, 7)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = read_losses(metrics)
    assert 7 <= max(before) < 10
    done = subprocess.run(jaxlm("train", "--config", conf, "--resume"), capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "resumed from step 6" in done.stderr or "resumed from step 3" in done.stderr
    got = read_losses(metrics)
    assert sorted(got) == list(range(1, 11))
    assert got == want  # exactly, step by step


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog):
    cfg = tiny_config(tmp_path, steps=4)
    cfg.checkpoint.every = 2
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir() if p.name.isdigit()) == ["2", "4"]
    for f in (ckpts / "4" / "params").rglob("*"):  # the array data of step 4 is gone
        if f.is_file() and "ocdbt" in str(f):
            f.unlink()
    shutil.rmtree(ckpts / "4" / "params" / "d", ignore_errors=True)
    cfg.train.steps = 5
    with caplog.at_level(logging.WARNING):
        out = train(cfg, resume=True)
    assert "checkpoint step 4" in caplog.text and "falling back" in caplog.text
    assert int(out.state.step) == 5
    losses = read_losses(tmp_path / "run" / "metrics.jsonl")
    assert sorted(losses) == [1, 2, 3, 4, 5]


def test_refuses_to_overwrite_without_resume(tmp_path):
    cfg = tiny_config(tmp_path, steps=2)
    cfg.checkpoint.every = 2
    train(cfg)
    import pytest

    from jaxlm.train.loop import TrainingError

    with pytest.raises(TrainingError, match="already holds checkpoints"):
        train(cfg)
