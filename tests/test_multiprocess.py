"""The multi-host path on one machine: 2 processes x 4 CPU devices, jax.distributed with a localhost
coordinator and gloo collectives, FSDP across the processes, one checkpoint saved and restored."""

import os
import shutil
import subprocess
import sys

import portpicker
from conftest import read_losses, tiny_config, write_config

from jaxlm.train.loop import train


def launch(conf, n, extra=()):
    port = portpicker.pick_unused_port()
    env = dict(os.environ)
    env["XLA_FLAGS"] = env["XLA_FLAGS"].replace("device_count=8", "device_count=4")
    procs = [subprocess.Popen([sys.executable, "-m", "jaxlm.cli", "train", "--config", str(conf),
                               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n),
                               "--process-id", str(i), *extra],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(n)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    return outs


def test_two_processes_match_one(tmp_path):
    cfg = tiny_config(tmp_path / "single", steps=3)
    cfg.parallel.update(data=1, fsdp=8)  # parameters sharded across both processes' devices
    cfg.data.num_shards = 2              # the same global batches for 1 or 2 processes
    cfg.checkpoint.update(every=2, async_save=True)
    train(cfg)  # this process: 8 devices
    want = read_losses(tmp_path / "single" / "run" / "metrics.jsonl")

    run = tmp_path / "multi" / "run"
    cfg.log.dir = str(run)
    conf = write_config(cfg, tmp_path / "cfg.py")
    launch(conf, 2)
    for name in ("metrics.jsonl", "metrics.p1.jsonl"):  # both processes computed the same losses
        got = read_losses(run / name)
        assert sorted(got) == [1, 2, 3]
        for s in got:
            assert abs(got[s] - want[s]) < 1e-5 * abs(want[s]), (name, s, got[s], want[s])

    # restore the step-2 checkpoint (written by both processes) and redo step 3
    shutil.rmtree(run / "checkpoints" / "3")
    outs = launch(conf, 2, ["--resume"])
    assert "resumed from step 2" in outs[0]
    got = read_losses(run / "metrics.p1.jsonl")
    assert abs(got[3] - want[3]) < 1e-5 * abs(want[3])
