"""The one impure training loop: data, jitted steps, evaluation, checkpoints, logs, progress.

Everything it calls is pure (steps, losses, the model); this file owns processes, files and time.
Language-model training and preference training share it: a `Task` supplies the data stream, the
loss and the evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from jaxlm import checkpoint, parallel
from jaxlm import config as C
from jaxlm.data import pipeline
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.model import Decoder, ModelConfig, logical_axes
from jaxlm.model.config import ConfigError
from jaxlm.train import metrics as M
from jaxlm.train import state as S
from jaxlm.train import steps

log = logging.getLogger(__name__)
MAX_GROUPS = 256
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")


class TrainingError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- tasks
class LMTask:
    """Next-token prediction on packed text or chat data. A task supplies the data stream, the loss,
    the frozen arrays the loss reads (none here) and the evaluation; the loop does the rest."""

    name = "train"

    def data(self, run: Run):
        cfg = run.cfg
        dc = pipeline.DataConfig.from_config(cfg.data, cfg.data.train, run.tok)
        shards = cfg.data.num_shards or jax.process_count()
        return pipeline.TrainData(dc, cfg.train.batch_size, shards, cfg.train.seed)

    def rows(self, cfg) -> int:
        """Rows of seq_len tokens in one global batch."""
        return cfg.train.batch_size

    def batch_keys(self):
        return BATCH_KEYS

    def loss_fn(self, model_cfg: ModelConfig, cfg):
        return None  # steps.make_train_step's default: the LM loss

    def frozen(self, run: Run):
        return None

    def evaluate(self, run: Run, params) -> dict:
        if not run.cfg.data.eval:
            return {}
        return evaluate_lm(run.model_cfg, params, run.cfg, run.mesh, run.tok, run.cfg.data.eval,
                           run.cfg.train.eval_batches)


@dataclasses.dataclass
class Run:
    cfg: Any
    model_cfg: ModelConfig
    mesh: Any
    tok: Tokenizer
    log_dir: Path
    console: Console


# ----------------------------------------------------------------------------- state
def state_shardings(model_cfg: ModelConfig, tx, mesh, rules, seed: int):
    """(create fn, abstract state, NamedSharding tree) for a TrainState on this mesh."""
    import flax.linen as nn

    def model_init(rng):
        return Decoder(model_cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]

    def create():
        return S.create(model_init, tx, jax.random.PRNGKey(seed))

    abstract = jax.eval_shape(create)
    specs = nn.get_partition_spec(abstract)
    shardings = parallel.logical_sharding(specs, mesh, rules)
    plain = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, abstract,
                         is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return create, plain, shardings


def params_shardings(model_cfg: ModelConfig, mesh, rules):
    return parallel.logical_sharding(logical_axes(model_cfg), mesh, rules)


def initial_params(model_cfg: ModelConfig, seed: int, mesh, rules):
    """The params a fresh run with this seed starts from (what S.create draws), sharded for mesh."""
    import flax.linen as nn

    rng = jax.random.split(jax.random.PRNGKey(seed))[0]
    with parallel.sharding_context(mesh, rules):
        return jax.jit(lambda: nn.meta.unbox(Decoder(model_cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]),
                       out_shardings=params_shardings(model_cfg, mesh, rules))()


@dataclasses.dataclass
class Trainer:
    """The jitted pieces of training on one mesh: `init()` -> state, `step(state, batch[, frozen])`."""

    init: Any
    step: Any
    abstract: Any  # TrainState of ShapeDtypeStruct
    shardings: Any  # TrainState of NamedSharding
    mesh: Any
    rules: Any
    with_frozen: bool = False

    def target(self):
        """The abstract state with shardings attached (what a restore needs)."""
        return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            self.abstract, self.shardings)

    def init_state(self):
        with parallel.sharding_context(self.mesh, self.rules):
            return self.init()

    def __call__(self, state, local_batch: dict, frozen=None):
        """One step on this process's rows of the global batch."""
        with parallel.sharding_context(self.mesh, self.rules):
            batch = parallel.global_batch(local_batch, self.mesh)
            return self.step(state, batch, frozen) if self.with_frozen else self.step(state, batch)


def make_trainer(model_cfg: ModelConfig, cfg, mesh, tx=None, loss_fn=None, frozen_shardings=None) -> Trainer:
    """Jit the init and the step for `mesh`. With `frozen_shardings` (for example the reference
    model's params) the step takes a third argument, read by the loss but never trained."""
    t, rules = cfg.train, cfg.parallel.rules
    tx = tx or S.optimizer(t)
    step_fn = steps.make_train_step(model_cfg, tx, t.grad_accum, t.loss_chunk, loss_fn)
    with parallel.sharding_context(mesh, rules):
        create, abstract, shardings = state_shardings(model_cfg, tx, mesh, rules, t.seed)
        init = jax.jit(lambda: S.unboxed(create()), out_shardings=shardings)
        ins = (shardings, parallel.batch_sharding(mesh))
        outs = (shardings, parallel.replicated(mesh))
        if frozen_shardings is None:
            step = jax.jit(lambda s, b: step_fn(s, b), in_shardings=ins, out_shardings=outs, donate_argnums=0)
        else:
            step = jax.jit(step_fn, in_shardings=ins + (frozen_shardings,), out_shardings=outs, donate_argnums=0)
    return Trainer(init, step, abstract, shardings, mesh, rules, frozen_shardings is not None)


# ----------------------------------------------------------------------------- evaluation
def evaluate_lm(model_cfg: ModelConfig, params, cfg, mesh, tok, sources: str, max_batches: int = 0,
                group_field: str | None = None) -> dict:
    """Per-token perplexity over `sources`, overall and per group (cfg.data.group_field)."""
    d = cfg.data
    dc = pipeline.DataConfig.from_config(d, sources, tok)
    if group_field is not None:
        dc.group_field = group_field
    bs = cfg.train.batch_size
    rows = bs // jax.process_count()
    lo = jax.process_index() * rows
    with parallel.sharding_context(mesh, cfg.parallel.rules):
        step = jax.jit(steps.make_eval_step(model_cfg, cfg.train.loss_chunk, MAX_GROUPS),
                       out_shardings=parallel.replicated(mesh))
        nll = np.zeros(MAX_GROUPS)
        count = np.zeros(MAX_GROUPS)
        groups = {}
        for batch, groups in pipeline.eval_batches(dc, bs, max_batches):
            if len(groups) > MAX_GROUPS:
                raise ConfigError(f"data.group_field {dc.group_field!r} has more than {MAX_GROUPS} values")
            local = {k: batch[k][lo:lo + rows] for k in BATCH_KEYS + ("group",)}
            s, n = step(params, parallel.global_batch(local, mesh))
            nll += np.asarray(s)
            count += np.asarray(n)
    total = count.sum()
    if total == 0:
        raise TrainingError(f"evaluation data {sources!r} produced no loss tokens")
    out = {"loss": float(nll.sum() / total), "tokens": int(total)}
    out["ppl"] = math.exp(out["loss"])
    if dc.group_field:
        out["groups"] = {name: {"loss": float(nll[i] / count[i]), "ppl": math.exp(nll[i] / count[i]),
                                "tokens": int(count[i])} for name, i in groups.items() if count[i]}
    return out


# ----------------------------------------------------------------------------- the loop
def _fmt_tokens(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K" if x >= 1e3 else f"{x:.0f}"


def train(cfg, *, resume: bool = False, init_from: str | None = None, task=None,
          console: Console | None = None) -> dict:
    """Run training as configured. Returns the last logged metrics and the final evaluation."""
    task = task or LMTask()
    console = console or Console(stderr=True)
    pa = cfg.parallel
    parallel.initialize(pa.coordinator_address or None, pa.num_processes or None, pa.process_id)
    C.validate(cfg)
    model_cfg = C.model_config(cfg)
    mesh = parallel.make_mesh(pa)
    parallel.check_batch(task.rows(cfg), mesh, cfg.train.grad_accum)
    if not cfg.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: give a tokenizer.json, a .tiktoken file or asset:tiny_bpe.json")
    tok = load_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is {model_cfg.vocab_size}")
    log_dir = checkpoint.as_path(cfg.log.dir)  # local, or gs://... (Orbax and TensorBoard write there)
    ckpt_dir = checkpoint.as_path(cfg.checkpoint.dir or log_dir / "checkpoints")
    run = Run(cfg, model_cfg, mesh, tok, log_dir, console)
    main = jax.process_index() == 0

    data = task.data(run)
    if main:
        for r in data.reports:
            for line in r.lines():
                console.print(f"[dim]data[/dim] {line}")
    it = data.iterator(jax.process_index(), jax.process_count())
    tx = S.optimizer(cfg.train)
    t = cfg.train
    ckpt = checkpoint.Checkpointer(ckpt_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    if ckpt.steps() and not resume:
        raise TrainingError(f"{ckpt_dir} already holds checkpoints (steps {ckpt.steps()}): pass --resume to "
                            "continue that run, or choose another log.dir")
    lr_at = S.schedule(t)
    frozen = task.frozen(run)
    frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    trainer = make_trainer(model_cfg, cfg, mesh, tx, task.loss_fn(model_cfg, cfg), frozen_sh)
    start, meta = 0, {}
    restored = None
    if resume:
        restored = ckpt.restore(trainer.target(), it)
        if restored is None:
            console.print(f"[yellow]nothing to resume in {ckpt_dir}; starting from scratch[/yellow]")
    if restored:
        state, meta, start = restored
        console.print(f"resumed from step {start} in {ckpt_dir}")
    else:
        state = trainer.init_state()
        if init_from:
            state = state.replace(params=checkpoint.load_params(init_from, trainer.shardings.params))
            console.print(f"initialised params from {init_from}")

    runlog = M.RunLog(log_dir, cfg.log.tensorboard, resume=resume and start > 0)
    peak, peak_src = M.peak_flops_per_device(cfg.log.peak_flops)
    flops_tok = model_cfg.flops_per_token(cfg.data.seq_len)
    tokens_per_step = task.rows(cfg) * cfg.data.seq_len
    if main:
        console.print(f"model {model_cfg.num_params / 1e6:.2f}M params; mesh {dict(mesh.shape)} on "
                      f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} process(es); "
                      f"peak {peak / 1e12:.2f} TFLOP/s/device ({peak_src})")
    config_json = C.to_dict(cfg)
    last_saved = start if restored else None
    window = {"loss": [], "tokens": 0, "t0": None, "steps": 0}
    last: dict = dict(meta.get("last", {}))
    evals: dict = {}
    progress = _progress(console, cfg, start) if main else None

    def finish(pending):
        """Fetch one step's metrics (a step late, so dispatch stays ahead), check, log."""
        nonlocal last
        s, m = pending
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(m["loss"]):
            good = f"the last good checkpoint is step {last_saved} in {ckpt_dir}" if last_saved is not None \
                else "no checkpoint was saved"
            raise TrainingError(f"non-finite loss {m['loss']} at step {s}; stopping ({good})")
        rec = {"step": s, "loss": m["loss"], "lr": float(lr_at(s - 1)), "grad_norm": m["grad_norm"],
               **{k: v for k, v in m.items() if k not in ("loss", "grad_norm")}}
        window["loss"].append((m["loss"], m["tokens"]))
        window["steps"] += 1
        if window["t0"] is None:  # the first step's time includes compilation
            window["t0"], window["steps"], window["loss"] = time.perf_counter(), 0, []
        if s % cfg.log.every == 0 or s == t.steps:
            dt = time.perf_counter() - window["t0"]
            if window["steps"] and dt > 0:
                tps = window["steps"] * tokens_per_step / dt
                tflops = tps * flops_tok / jax.device_count()
                rec.update(tokens_per_s=tps, tflops_per_device=tflops / 1e12, mfu=tflops / peak)
            if window["loss"]:
                w = sum(n for _, n in window["loss"])
                rec["loss_avg"] = sum(v * n for v, n in window["loss"]) / max(w, 1)
                rec["ppl"] = math.exp(min(rec["loss_avg"], 50))
            window.update(loss=[], steps=0, t0=time.perf_counter())
            if main:
                msg = f"step {s:>6} | loss {rec.get('loss_avg', m['loss']):.4f} | lr {rec['lr']:.2e} | " \
                      f"gnorm {m['grad_norm']:.3f}"
                if "tokens_per_s" in rec:
                    msg += f" | {_fmt_tokens(rec['tokens_per_s'])} tok/s | {rec['tflops_per_device']:.3f} " \
                           f"TFLOP/s/dev | MFU {rec['mfu']:.1%}"
                console.print(msg)
            c = pipeline.counters(it.get_state())
            pipeline.check_counters(c, data.reports, cfg.data.max_bad_fraction)
        runlog.write(rec, flush=s % cfg.log.every == 0 or s == t.steps)
        last = rec
        if progress:
            progress.update(s, m["loss"])

    pending = None
    try:
        for s in range(start, t.steps):
            local = next(it)
            state, m = trainer(state, {k: local[k] for k in task.batch_keys()}, frozen)
            if pending:
                finish(pending)
            pending = (s + 1, m)
            at_end = s + 1 == t.steps
            do_eval = at_end or (t.eval_every and (s + 1) % t.eval_every == 0)
            do_ckpt = at_end or (cfg.checkpoint.every and (s + 1) % cfg.checkpoint.every == 0)
            if do_eval or do_ckpt:
                finish(pending)
                pending = None
            if do_ckpt:
                counters = pipeline.counters(it.get_state())
                ckpt.save(s + 1, state, config=config_json, tokenizer=tok.spec(), data_iter=it,
                          meta={"last": last, "data": counters})
                last_saved = s + 1
            if do_eval:
                res = task.evaluate(run, state.params)
                if res:
                    evals = res
                    rec = {"step": s + 1, **{k: v for k, v in res.items() if not isinstance(v, dict)}}
                    runlog.write({**rec, **{f"{g}/{k}": v for g, m in res.get("groups", {}).items()
                                            for k, v in m.items()}}, prefix="eval")
                    if main:
                        console.print(f"[cyan]eval step {s + 1}[/cyan] | " + " | ".join(
                            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items()
                            if k != "step"))
            if (do_eval or do_ckpt) and window["t0"] is not None:
                window.update(t0=time.perf_counter(), steps=0)  # evaluating and saving are not throughput
        if pending:
            finish(pending)
    finally:
        if progress:
            progress.close()
        ckpt.close()
        runlog.close()
        close = getattr(it, "close", None)
        if close:
            close()
    return {"last": last, "eval": evals, "state": state, "run": run,
            "data": pipeline.counters(it.get_state()) if hasattr(it, "get_state") else {}}


class _progress:  # noqa: N801
    """A rich progress bar with ETA on terminals; nothing otherwise (log lines carry the news)."""

    def __init__(self, console: Console, cfg, start: int):
        self.bar = None
        if not (cfg.log.progress and console.is_terminal):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
                            TimeRemainingColumn(), console=console, transient=True)
        self.task = self.bar.add_task("train", total=cfg.train.steps, completed=start, loss="-")
        self.bar.start()

    def update(self, step, loss):
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.3f}")

    def close(self):
        if self.bar:
            self.bar.stop()
