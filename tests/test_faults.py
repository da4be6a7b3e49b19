"""Faults and bad input: every user mistake is one clear line (exit 2), nothing bad is ever saved as
good, corrupt checkpoints are skipped, preemption loses nothing, and exports work on their own."""

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_losses, run_until_step, tiny_config, write_config

from jaxlm import checkpoint
from jaxlm import config as run_config
from jaxlm.cli import main
from jaxlm.data.tokenizer import load_tokenizer
from jaxlm.errors import TrainingError
from jaxlm.model import init_params
from jaxlm.train.loop import train

REPO = Path(__file__).resolve().parent.parent


def cli(argv, capsys):
    """(exit status, stderr) of an in-process `jaxlm` call."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


def one_error_line(err: str) -> str:
    """The error line of a one-line failure: no traceback, `error:` first (a `hint:` may follow)."""
    assert "Traceback" not in err, err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    errors = [x for x in lines if x.startswith("error:")]
    assert len(errors) == 1 and all(x.startswith(("error:", "hint:")) for x in lines), err
    return errors[0]


def jaxlm_cmd(*args):
    return [sys.executable, "-m", "jaxlm.cli", *map(str, args)]


# ----------------------------------------------------------------------------- 1. --help-config
@pytest.mark.parametrize("command", ["train", "align", "generate"])
def test_help_config_with_and_without_a_config(command, capsys):
    assert main([command, "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "tfds:NAME[/CONFIG]:SPLIT" in out and re.search(r"train\.lr\s*│\s*0\.0003", out)
    assert main([command, "--config", "configs/quickstart.py", "--config.train.lr=0.5", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"train\.lr\s*│\s*0\.5", out)  # the config's value, not the default


# ----------------------------------------------------------------------------- 2. ranges
@pytest.mark.parametrize("override,message", [
    ("train.lr=-0.001", "train.lr must be >= 0, got -0.001"),
    ("train.lr=nan", "train.lr must be a finite number, got nan"),
    ("train.lr=inf", "train.lr must be a finite number, got inf"),
    ("train.weight_decay=-1", "train.weight_decay must be >= 0, got -1"),
    ("train.b1=1.5", "train.b1 must be in [0, 1), got 1.5"),
    ("train.b2=1.0", "train.b2 must be in [0, 1), got 1.0"),
    ("train.eps=0", "train.eps must be > 0, got 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.batch_size=-4", "train.batch_size must be >= 1, got -4"),
    ("train.steps=0", "train.steps must be >= 1, got 0"),
    ("train.min_lr_ratio=2", "train.min_lr_ratio must be in [0, 1], got 2"),
    ("train.trainable=(", "train.trainable '(' is not a regular expression"),
    ("data.max_bad_fraction=1.5", "data.max_bad_fraction must be in [0, 1], got 1.5"),
    ("model.rms_norm_eps=0", "model.rms_norm_eps must be > 0, got 0"),
    ("align.beta=0", "align.beta must be > 0, got 0"),
    ("align.loss=dpoo", "unknown align.loss 'dpoo' (did you mean 'dpo'?)"),
    ("checkpoint.keep=0", "checkpoint.keep must be >= 1, got 0"),
])
def test_impossible_hyperparameters_stop_at_start_up(override, message, capsys):
    rc, err = cli(["train", "--config", "configs/quickstart.py", f"--config.{override}"], capsys)
    assert rc == 2 and message in one_error_line(err)


# ----------------------------------------------------------------------------- 3. nothing bad saved as good
def test_a_non_finite_update_is_never_applied_or_saved(tmp_path):
    cfg = tiny_config(tmp_path, steps=6, lr=1e30, warmup_steps=0, clip_norm=0.0)
    cfg.checkpoint.every = 1
    with pytest.raises(TrainingError) as e:
        train(cfg)
    bad = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert "the update was not applied" in str(e.value)
    steps = sorted(int(p.name) for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and steps[-1] == bad - 1 and f"last good checkpoint is step {bad - 1}" in str(e.value)
    params = checkpoint.load_params(tmp_path / "run" / "checkpoints")  # "last good" really is good
    assert all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves(params))


def test_the_step_keeps_the_old_state_on_a_non_finite_update():
    from jaxlm.train import state as train_state
    from jaxlm.train import steps

    cfg = run_config.build(tiny_config())
    params = init_params(cfg.model, jax.random.key(0))
    tx = train_state.optimizer(cfg.train)
    state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                                   rng=jax.random.PRNGKey(0))
    step = jax.jit(steps.make_train_step(cfg.model, tx))
    tokens = jnp.ones((2, 8), jnp.int32)
    batch = {"tokens": tokens, "targets": tokens, "loss_mask": jnp.ones_like(tokens),
             "segment_ids": jnp.ones_like(tokens), "positions": jnp.tile(jnp.arange(8), (2, 1))}
    good, m = step(state, batch)
    assert bool(m["finite"]) and int(good.step) == 1
    poisoned = state.replace(params=jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), params))
    same, m = step(poisoned, batch)
    assert not bool(m["finite"]) and int(same.step) == 0
    for a, b in zip(jax.tree.leaves(same.opt_state), jax.tree.leaves(poisoned.opt_state)):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- 4. silent corruption
def test_flipped_bytes_in_a_checkpoint_are_detected_and_skipped(tmp_path):
    cfg = tiny_config(tmp_path, steps=4)
    cfg.checkpoint.every = 2
    train(cfg)
    ckpts = tmp_path / "run" / "checkpoints"
    files = sorted((f for f in (ckpts / "4" / "params").rglob("*") if f.is_file() and "/d/" in str(f)),
                   key=lambda f: -f.stat().st_size)
    data = bytearray(files[0].read_bytes())
    mid = len(data) // 2
    data[mid:mid + 64] = bytes(b ^ 0x5A for b in data[mid:mid + 64])
    files[0].write_bytes(bytes(data))
    conf = write_config(cfg, tmp_path / "cfg.py")
    out = subprocess.run(jaxlm_cmd("train", "--config", conf, "--resume", "--config.train.steps=5"),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "checkpoint step 4" in out.stderr and "falling back" in out.stderr
    assert "resumed from step 2" in out.stderr
    assert "Exception ignored" not in out.stderr and out.stderr.count("\n") < 40, out.stderr
    assert (ckpts / "4.unreadable").is_dir() and (ckpts / "5").is_dir()
    # evaluating or converting the corrupt step fails with one line naming it
    assert sorted(read_losses(tmp_path / "run" / "metrics.jsonl")) == [1, 2, 3, 4, 5]


def test_a_corrupt_checkpoint_is_one_error_line_for_eval(tmp_path, capsys):
    cfg = tiny_config()
    params = init_params(run_config.build(cfg).model, jax.random.key(0))
    tok = load_tokenizer(cfg.data.tokenizer)
    checkpoint.save_params(tmp_path / "ck", params, run_config.to_dict(cfg), tok.spec())
    f = max((f for f in (tmp_path / "ck").rglob("*") if f.is_file() and "/d/" in str(f)), key=lambda f: f.stat().st_size)
    data = bytearray(f.read_bytes())
    data[len(data) // 2:len(data) // 2 + 64] = bytes(64)
    f.write_bytes(bytes(data))
    rc, err = cli(["generate", "--checkpoint", tmp_path / "ck", "--prompt", "x", "--max-new-tokens", "1"], capsys)
    assert rc == 2 and "corrupt" in one_error_line(err) or "cannot be read" in err


# ----------------------------------------------------------------------------- 5. preemption
@pytest.mark.parametrize("sig,code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_saves_stops_and_resumes_exactly(tmp_path, sig, code):
    cfg = tiny_config(tmp_path / "ref", steps=10)
    cfg.checkpoint.update(every=100, async_save=True)
    train(cfg)
    want = read_losses(tmp_path / "ref" / "run" / "metrics.jsonl")

    cfg.log.dir = str(tmp_path / "stopped")
    conf = write_config(cfg, tmp_path / "cfg.py")
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    proc = subprocess.Popen(jaxlm_cmd("train", "--config", conf), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    run_until_step(proc, metrics, 3)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err[-2000:]
    stopped = int(re.search(r"stopped at step (\d+)", err).group(1))
    assert 3 <= stopped < 10 and "resume with --resume" in err and "Traceback" not in err
    model_line = next(x for x in err.splitlines() if x.startswith("model "))
    assert len(model_line) > 80 and model_line.rstrip().endswith(")")  # a pipe gets whole lines, unwrapped
    assert (tmp_path / "stopped" / "checkpoints" / str(stopped)).is_dir()
    done = subprocess.run(jaxlm_cmd("train", "--config", conf, "--resume"), capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from step {stopped}" in done.stderr
    steps = [json.loads(x)["step"] for x in open(metrics) if "lr" in json.loads(x)]
    assert steps == list(range(1, 11))  # every step logged once
    assert read_losses(metrics) == want  # exactly, step by step


def test_sigterm_stops_both_processes_of_a_local_launch(tmp_path):
    """SIGTERM to one of two processes (what a preempted host gets): JAX's preemption service tells the
    other, both save the same step and exit 143, and the resumed 2-process run matches a straight one."""
    cfg = tiny_config(tmp_path / "ref", steps=12)
    cfg.parallel.update(data=1, fsdp=8)
    cfg.data.update(num_shards=2, eval="")
    cfg.checkpoint.update(every=100, async_save=True)
    cfg.log.peak_flops = 1e12
    train(cfg)
    want = read_losses(tmp_path / "ref" / "run" / "metrics.jsonl")
    cfg.log.dir = str(tmp_path / "multi")
    conf = write_config(cfg, tmp_path / "cfg.py")
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def launch(*extra, logs):
        return subprocess.Popen(["bash", str(REPO / "launch" / "local.sh"), "-n", "2", "-d", "4", "-q", "--timeout",
                                 "300", "--python", sys.executable, "-l", str(logs), "--", "train", "--config",
                                 str(conf), *extra], cwd=REPO, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    proc = launch(logs=tmp_path / "logs1")
    metrics = tmp_path / "multi" / "metrics.p1.jsonl"
    run_until_step(proc, metrics, 3, deadline=300)
    pids = subprocess.run(["pgrep", "-f", "--", f"--config {conf} --coordinator"], capture_output=True, text=True).stdout.split()
    victim = next(p for p in pids if "--process-id 1" in Path(f"/proc/{p}/cmdline").read_text().replace("\0", " "))
    os.kill(int(victim), signal.SIGTERM)
    out = proc.communicate(timeout=300)[0]
    logs = [(tmp_path / "logs1" / f"process-{i}.log").read_text() for i in range(2)]
    assert proc.returncode == 143, out + "".join(x[-2000:] for x in logs)
    stops = [int(re.search(r"stopped at step (\d+)", x).group(1)) for x in logs]
    assert stops[0] == stops[1] and 3 <= stops[0] < 12
    res = launch("--resume", logs=tmp_path / "logs2")
    out = res.communicate(timeout=300)[0]
    assert res.returncode == 0, out
    for name in ("metrics.jsonl", "metrics.p1.jsonl"):
        got = read_losses(tmp_path / "multi" / name)
        assert sorted(got) == list(range(1, 13))
        for s in got:
            assert abs(got[s] - want[s]) < 1e-5 * abs(want[s]), (name, s)


# ----------------------------------------------------------------------------- 6, 7. one-line errors
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = tiny_config()
    path = tmp_path_factory.mktemp("ck") / "ckpt"
    params = init_params(run_config.build(cfg).model, jax.random.key(0))
    checkpoint.save_params(path, params, run_config.to_dict(cfg), load_tokenizer(cfg.data.tokenizer).spec())
    return path


@pytest.mark.parametrize("extra,message", [
    (["--max-new-tokens", "0"], "argument --max-new-tokens: must be >= 1, got 0"),
    (["--max-new-tokens", "-3"], "argument --max-new-tokens: must be >= 1, got -3"),
    (["--temperature", "-1"], "argument --temperature: must be >= 0, got -1"),
    (["--top-p", "0"], "argument --top-p: must be in (0, 1], got 0"),
    (["--top-k", "x"], "argument --top-k: 'x' is not an integer"),
])
def test_bad_generate_flags(ckpt, extra, message, capsys):
    rc, err = cli(["generate", "--checkpoint", ckpt, "--prompt", "hi", *extra], capsys)
    assert rc == 2 and message in one_error_line(err)


def test_prompt_longer_than_the_context_is_refused(ckpt, capsys):
    rc, err = cli(["generate", "--checkpoint", ckpt, "--prompt", "to be or not " * 400], capsys)
    assert rc == 2 and "more than the model's context of 1024" in one_error_line(err) and "--long-input" in err


def test_unwritable_log_dir(tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):
            pytest.skip("running as a user who can write anywhere")
        rc, err = cli(["train", "--config", "configs/quickstart.py", f"--config.log.dir={ro}/run"], capsys)
        assert rc == 2 and "log.dir" in one_error_line(err) and "not writable" in err
    finally:
        ro.chmod(0o700)


def test_unwritable_log_dir_as_root(tmp_path, capsys):
    """Root can write anywhere, but not under a regular file."""
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, err = cli(["train", "--config", "configs/quickstart.py", f"--config.log.dir={blocker}/run"], capsys)
    assert rc == 2 and f"log.dir {blocker}/run is not writable" in one_error_line(err)


def test_resume_of_a_missing_run(tmp_path, capsys):
    rc, err = cli(["train", "--config", "configs/quickstart.py", f"--config.log.dir={tmp_path}/nope", "--resume"], capsys)
    assert rc == 2 and f"the run directory {tmp_path}/nope does not exist" in one_error_line(err)


def test_convert_refuses_to_overwrite(tmp_path, ckpt, capsys):
    from hf_util import phi3_model

    _, folder = phi3_model(tmp_path)
    out = tmp_path / "conv"
    assert cli(["convert", "--from-hf", folder, "--out", out], capsys)[0] == 0
    rc, err = cli(["convert", "--from-hf", folder, "--out", out], capsys)
    assert rc == 2 and "already exists" in one_error_line(err) and "--overwrite" in err
    assert cli(["convert", "--from-hf", folder, "--out", out, "--overwrite"], capsys)[0] == 0
    run = tmp_path / "run"  # a training run's checkpoint folder
    (run / "checkpoints" / "100").mkdir(parents=True)
    rc, err = cli(["convert", "--from-hf", folder, "--out", run / "checkpoints"], capsys)
    assert rc == 2 and "already exists" in one_error_line(err)
    hf_out = tmp_path / "hf"
    hf_out.mkdir()
    (hf_out / "README.md").write_text("mine")
    rc, err = cli(["convert", "--to-hf", "--checkpoint", ckpt, "--out", hf_out], capsys)
    assert rc == 2 and "already exists" in one_error_line(err)
    assert (hf_out / "README.md").read_text() == "mine"


def test_eval_group_field_that_no_row_has(tmp_path, ckpt, capsys):
    data = tmp_path / "e.jsonl"
    data.write_text("".join(json.dumps({"text": f"to be or not {i}"}) + "\n" for i in range(4)))
    rc, err = cli(["eval", "--checkpoint", ckpt, "--data", data, "--group-field", "family", "--batch-size", "8",
                   "--seq-len", "32"], capsys)
    assert rc == 2 and "no record" in one_error_line(err) and "'family'" in err


def test_data_report_counts_only_the_selected_records(tmp_path):
    from jaxlm.data.sources import lm_validator, open_spec, parse_spec

    p = tmp_path / "d.jsonl"
    p.write_text("".join((json.dumps({"text": f"t{i}"}) if i % 5 else "{broken") + "\n" for i in range(100)))
    (spec,) = parse_spec(f"{p}[:10]")
    src = open_spec(spec, lm_validator())
    assert len(src) == 10 and src.report.good == 10
    assert sum(src.report.bad.values()) == 2  # lines 6 and 11 lie among the first 10 good records
    assert src.report.name.endswith("d.jsonl[:10]")


def test_tokenizer_vocab_below_the_byte_alphabet(tmp_path, capsys):
    rc, err = cli(["tokenizer", "train", "--data", "asset:shakespeare/train.jsonl", "--vocab-size", "10",
                   "--out", tmp_path / "t.json"], capsys)
    assert rc == 2 and "below the smallest byte-level BPE" in one_error_line(err)
    assert not (tmp_path / "t.json").exists()


def test_unknown_config_fields_and_files(capsys):
    rc, err = cli(["train", "--config", "configs/quickstart.py", "--config.train.stepz=3"], capsys)
    assert rc == 2 and "did you mean 'train.steps'" in one_error_line(err)
    rc, err = cli(["train", "--config", "configs/nope.py"], capsys)
    assert rc == 2 and "config file configs/nope.py not found" in one_error_line(err)
    rc, err = cli(["train"], capsys)
    assert rc == 2 and "--config is required" in one_error_line(err)


def test_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="train.lr must be >= 0"):
        main(["--debug", "train", "--config", "configs/quickstart.py", "--config.train.lr=-1"])


# ----------------------------------------------------------------------------- 9. logs
def test_throughput_of_every_step_is_timed_device_to_device(tmp_path):
    """With log.every=1 a window is timed from a step's device-ready to the next one's (so every other
    step, as dispatch runs one step ahead): the MFU stays a fraction (the bug timed an empty window and
    printed 20443%)."""
    cfg = tiny_config(tmp_path, steps=8)
    cfg.log.every = 1
    train(cfg)
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    timed = [r for r in rows if "mfu" in r]
    assert len(timed) >= 3
    assert all(0 < r["mfu"] < 1 for r in timed), [r["mfu"] for r in timed]


# ----------------------------------------------------------------------------- 8. exports
def test_an_exported_folder_works_alone(tmp_path):
    """A model trained to answer in chat ends its reply with <|end|>; exported, transformers loads the
    folder with nothing else (tokenizer, chat template, generation config) and stops where jaxlm does."""
    transformers = pytest.importorskip("transformers")
    import torch

    from jaxlm.infer.generate import generate

    chats = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
             for q, a in [("who art thou", "the king"), ("what is this", "a sword"), ("where", "the sea")]] * 30
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in chats))
    cfg = tiny_config(tmp_path, steps=60, lr=5e-3, warmup_steps=5, batch_size=8)
    cfg.data.update(train=str(data), eval="", seq_len=32)
    result = train(cfg)
    ckpt = tmp_path / "run" / "checkpoints"
    out = tmp_path / "hf"
    assert main(["convert", "--to-hf", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert {"tokenizer.json", "tokenizer_config.json", "generation_config.json", "config.json"} <= {
        p.name for p in out.iterdir()}

    tok = result.run.tok
    messages = [{"role": "user", "content": "who art thou"}]
    from jaxlm.data.tokenizer import apply_chat_template

    ids, _ = apply_chat_template(tok, messages, add_generation_prompt=True)
    mine = generate(result.run.model_cfg, result.state.params, [ids], max_new_tokens=12,
                    stop_tokens=tok.stop_ids).tokens[0]
    assert mine[-1] == tok.token_id("<|end|>") and len(mine) < 12  # it stopped

    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    hf_ids = hf_ids["input_ids"] if isinstance(hf_ids, dict) or hasattr(hf_ids, "keys") else hf_ids
    assert list(hf_ids) == ids
    assert hf_tok.encode("the king of the sea", add_special_tokens=False) == tok.encode("the king of the sea")
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert gen[0, len(ids):].tolist() == mine
