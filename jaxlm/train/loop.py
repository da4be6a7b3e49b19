"""The one impure training loop: data, jitted steps, evaluation, checkpoints, logs, progress, signals.

Everything it calls is pure (steps, losses, the model); this file owns processes, files and time.
Language-model training and preference training share it: a `Task` supplies the data stream, the
loss and the evaluation.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console
from rich.markup import escape

from jaxlm import checkpoint, parallel
from jaxlm.data import pipeline
from jaxlm.data.config import DataConfig
from jaxlm.data.tokenizer import Tokenizer, load_tokenizer
from jaxlm.errors import ConfigError, DataError, Interrupted, TrainingError
from jaxlm.model import Decoder, ModelConfig, logical_axes, lora
from jaxlm.train import state as train_state
from jaxlm.train import steps
from jaxlm.train.config import RunConfig
from jaxlm.train.metrics import Reporter, RunLog, StepTimer, peak_flops_per_device
from jaxlm.train.preemption import StopSignals

log = logging.getLogger(__name__)
MAX_GROUPS = 256

__all__ = ["LMTask", "Run", "Task", "TrainResult", "Trainer", "evaluate_lm", "initial_params", "make_trainer",
           "params_shardings", "train"]


# ----------------------------------------------------------------------------- tasks
@dataclasses.dataclass
class Run:
    """What a task reads: the run's config, the model, the mesh, the tokenizer, where it writes."""

    cfg: RunConfig
    model_cfg: ModelConfig
    mesh: Any
    tok: Tokenizer
    log_dir: Any
    console: Console


class Task(Protocol):
    """What the loop trains: language modelling (`LMTask`) or preference optimisation
    (`jaxlm.align.train.AlignTask`)."""

    batch_keys: tuple[str, ...]  # the arrays of a batch the step reads

    def rows(self, cfg: RunConfig) -> int:
        """Rows of seq_len tokens in one global batch."""

    def data(self, run: Run):
        """The training stream: `.reports` (per source) and `.iterator(process_index, process_count)`."""

    def loss_fn(self, run: Run):
        """`loss_fn(params, batch, frozen) -> (summed loss, weight, aux sums)`, or None for the LM loss."""

    def frozen(self, run: Run):
        """Arrays the loss reads but never trains (a reference model's params), or None."""

    def evaluate(self, run: Run, params) -> dict:
        """Held-out metrics ({} when there is no held-out data)."""


class LMTask:
    """Next-token prediction on packed text or chat data."""

    batch_keys = pipeline.BATCH_KEYS

    def rows(self, cfg: RunConfig) -> int:
        return cfg.train.batch_size

    def data(self, run: Run):
        cfg = run.cfg
        shards = cfg.data.num_shards or jax.process_count()
        return pipeline.TrainData(cfg.data, cfg.data.train, run.tok, cfg.train.batch_size, shards, cfg.train.seed)

    def loss_fn(self, run: Run):
        return None

    def frozen(self, run: Run):
        return None

    def evaluate(self, run: Run, params) -> dict:
        cfg = run.cfg
        if not cfg.data.eval:
            return {}
        return evaluate_lm(run.model_cfg, params, cfg.data, cfg.data.eval, run.tok, run.mesh, cfg.parallel.rules,
                           cfg.train.batch_size, cfg.train.loss_chunk, cfg.train.eval_batches, cfg.data.group_field)


@dataclasses.dataclass
class TrainResult:
    last: dict  # the last logged training metrics
    eval: dict  # the last evaluation ({} when none ran)
    state: Any  # the final TrainState
    run: Run
    data: dict  # data counters (records, tokens per source, bad rows)


# ----------------------------------------------------------------------------- state
def _init_fn(model_cfg: ModelConfig):
    def model_init(rng):
        return Decoder(model_cfg).init(rng, jnp.zeros((1, 1), jnp.int32))["params"]
    return model_init


def state_shardings(model_cfg: ModelConfig, tx, mesh, rules, seed: int):
    """(create fn, abstract state, NamedSharding tree) for a TrainState on this mesh."""
    import flax.linen as nn

    def create():
        return train_state.create(_init_fn(model_cfg), tx, jax.random.PRNGKey(seed))

    abstract = jax.eval_shape(create)
    specs = nn.get_partition_spec(abstract)
    shardings = parallel.logical_sharding(specs, mesh, rules)
    plain = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, abstract,
                         is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    return create, plain, shardings


def params_shardings(model_cfg: ModelConfig, mesh, rules):
    return parallel.logical_sharding(logical_axes(model_cfg), mesh, rules)


def initial_params(model_cfg: ModelConfig, seed: int, mesh, rules):
    """The params a fresh run with this seed starts from (what `train_state.create` draws), sharded for mesh."""
    import flax.linen as nn

    rng = jax.random.split(jax.random.PRNGKey(seed))[0]
    with parallel.sharding_context(mesh, rules):
        return jax.jit(lambda: nn.meta.unbox(_init_fn(model_cfg)(rng)),
                       out_shardings=params_shardings(model_cfg, mesh, rules))()


@dataclasses.dataclass
class Trainer:
    """The jitted pieces of training on one mesh: `init_state()` -> state, `trainer(state, batch[, frozen])`."""

    init: Any
    step: Any
    abstract: Any  # TrainState of ShapeDtypeStruct
    shardings: Any  # TrainState of NamedSharding
    mesh: Any
    rules: Any
    with_frozen: bool = False

    def target(self):
        """The abstract state with shardings attached (what a restore needs). The shardings tree has a
        leaf where frozen params' optimizer state is an empty `MaskedNode` (train.trainable, LoRA)."""
        return jax.tree.map(lambda s, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s) if hasattr(a, "shape")
                            else a, self.shardings, self.abstract)

    def init_state(self):
        with parallel.sharding_context(self.mesh, self.rules):
            return self.init()

    def __call__(self, state, local_batch: dict, frozen=None):
        """One step on this process's rows of the global batch."""
        with parallel.sharding_context(self.mesh, self.rules):
            batch = parallel.global_batch(local_batch, self.mesh)
            return self.step(state, batch, frozen) if self.with_frozen else self.step(state, batch)


def make_trainer(model_cfg: ModelConfig, cfg: RunConfig, mesh, tx=None, loss_fn=None,
                 frozen_shardings=None) -> Trainer:
    """Jit the init and the step for `mesh`. With `frozen_shardings` (for example the reference
    model's params) the step takes a third argument, read by the loss but never trained."""
    t, rules = cfg.train, cfg.parallel.rules
    tx = tx or train_state.optimizer(t, model_cfg)
    step_fn = steps.make_train_step(model_cfg, tx, t.grad_accum, t.loss_chunk, loss_fn,
                                    train_state.trainable_pattern(t, model_cfg))
    with parallel.sharding_context(mesh, rules):
        create, abstract, shardings = state_shardings(model_cfg, tx, mesh, rules, t.seed)
        init = jax.jit(lambda: train_state.unboxed(create()), out_shardings=shardings)
        ins = (shardings, parallel.batch_sharding(mesh))
        outs = (shardings, parallel.replicated(mesh))
        if frozen_shardings is None:
            step = jax.jit(lambda s, b: step_fn(s, b), in_shardings=ins, out_shardings=outs, donate_argnums=0)
        else:
            step = jax.jit(step_fn, in_shardings=ins + (frozen_shardings,), out_shardings=outs, donate_argnums=0)
    return Trainer(init, step, abstract, shardings, mesh, rules, frozen_shardings is not None)


# ----------------------------------------------------------------------------- evaluation
def evaluate_lm(model_cfg: ModelConfig, params, data: DataConfig, sources: str, tok: Tokenizer, mesh, rules,
                batch_size: int, chunk: int = 256, max_batches: int = 0, group_field: str = "") -> dict:
    """Per-token perplexity over `sources`, overall and per value of the record field `group_field`."""
    with parallel.sharding_context(mesh, rules):
        step = jax.jit(steps.make_eval_step(model_cfg, chunk, MAX_GROUPS), out_shardings=parallel.replicated(mesh))
        nll = np.zeros(MAX_GROUPS)
        count = np.zeros(MAX_GROUPS)
        groups = {}
        for batch, groups in pipeline.eval_batches(data, sources, tok, batch_size, max_batches, group_field):
            if len(groups) > MAX_GROUPS:
                raise ConfigError(f"the group field {group_field!r} has more than {MAX_GROUPS} values")
            local = parallel.local_rows(batch, batch_size, pipeline.BATCH_KEYS + ("group",))
            s, n = step(params, parallel.global_batch(local, mesh))
            nll += np.asarray(s)
            count += np.asarray(n)
    total = count.sum()
    if total == 0:
        raise DataError(f"evaluation data {sources!r} produced no loss tokens")
    out = {"loss": float(nll.sum() / total), "tokens": int(total)}
    out["ppl"] = math.exp(out["loss"])
    if group_field:
        if set(groups) == {""}:
            raise DataError(f"no record of {sources!r} has the group field {group_field!r}")
        out["groups"] = {name: {"loss": float(nll[i] / count[i]), "ppl": math.exp(nll[i] / count[i]),
                                "tokens": int(count[i])} for name, i in groups.items() if count[i]}
    return out


# ----------------------------------------------------------------------------- set-up
def check_writable(path, what: str) -> None:
    """Create `path` (a local folder) and make sure this process can write there."""
    if "://" in str(path):
        return
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".jaxlm-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"{what} {path} is not writable ({e.strerror or e})",
                          hint=f"choose another --config.{what}") from None


def setup_run(cfg: RunConfig, console: Console, resume: bool, init_from: str | None = None) -> Run:
    """Start the distributed runtime, build the mesh, load the tokenizer (data.tokenizer, else the
    --init checkpoint's), check the run directory."""
    parallel.initialize_from(cfg.parallel)
    model_cfg = cfg.model
    mesh = parallel.make_mesh(cfg.parallel)
    spec = cfg.data.tokenizer or (checkpoint.load_tokenizer_spec(init_from) if init_from else None)
    if not spec:
        raise ConfigError("data.tokenizer is empty: give a tokenizer.json, a .tiktoken file or asset:tiny_bpe.json")
    tok = load_tokenizer(spec)
    if tok.vocab_size > model_cfg.vocab_size:
        raise ConfigError(f"the tokenizer has {tok.vocab_size} tokens but model.vocab_size is {model_cfg.vocab_size}")
    log_dir = checkpoint.as_path(cfg.log.dir)  # local, or gs://... (Orbax and TensorBoard write there)
    if resume and not log_dir.exists():
        raise ConfigError(f"--resume: the run directory {log_dir} does not exist",
                          hint="check --config.log.dir, or start a new run without --resume")
    check_writable(log_dir, "log.dir")
    if cfg.checkpoint.dir:
        check_writable(checkpoint.as_path(cfg.checkpoint.dir), "checkpoint.dir")
    return Run(cfg, model_cfg, mesh, tok, log_dir, console)


def restore_or_init(trainer: Trainer, ckpt: checkpoint.Checkpointer, it, resume: bool, init_from: str | None,
                    console: Console):
    """(state, first step, saved meta): the latest readable checkpoint when resuming, else fresh
    params (or those of `init_from`)."""
    if ckpt.steps() and not resume:
        raise TrainingError(f"{ckpt.directory} already holds checkpoints (steps {ckpt.steps()})",
                            hint="pass --resume to continue that run, or choose another --config.log.dir")
    if resume:
        restored = ckpt.restore(trainer.target(), it)
        if restored is not None:
            state, meta, start = restored
            console.print(f"resumed from step {start} in {escape(str(ckpt.directory))}")
            return state, start, meta
        console.print(f"[yellow]nothing to resume in {escape(str(ckpt.directory))}; starting from scratch[/yellow]")
    state = trainer.init_state()
    if init_from:
        state = state.replace(params=init_params_from(init_from, trainer.shardings.params, state.params))
        console.print(f"initialised params from {escape(str(init_from))}")
    return state, 0, {}


def init_params_from(path, shardings, fresh):
    """The params of checkpoint `path` for this run; a LoRA run from a checkpoint without adapters
    takes its base from there and keeps its fresh adapters (B = 0: it starts as the base model)."""
    saved = checkpoint.load_config(path).get("model", {}) or {}
    if fresh is not None and lora.split(fresh)[1] and not (saved.get("lora") or {}).get("rank", 0):
        base_sh = lora.split(shardings)[0]
        return lora.join(checkpoint.load_params(path, base_sh), lora.split(fresh)[1])
    return checkpoint.load_params(path, shardings)


# ----------------------------------------------------------------------------- the loop
def train(cfg, *, resume: bool = False, init_from: str | None = None, task: Task | None = None,
          console: Console | None = None) -> TrainResult:
    """Run training as configured (a RunConfig, or a ConfigDict / dict of one)."""
    cfg = RunConfig.from_dict(cfg)
    task = task or LMTask()
    console = console or Console(stderr=True, soft_wrap=True)
    run = setup_run(cfg, console, resume, init_from)
    main = jax.process_index() == 0
    parallel.check_batch(task.rows(cfg), run.mesh, cfg.train.grad_accum)
    t = cfg.train

    data = task.data(run)
    if main:
        for r in data.reports:
            for line in r.lines():
                console.print(f"[dim]data[/dim] {escape(line)}")
    it = data.iterator(jax.process_index(), jax.process_count())
    frozen = task.frozen(run)
    frozen_sh = None if frozen is None else jax.tree.map(lambda x: x.sharding, frozen)
    trainer = make_trainer(run.model_cfg, cfg, run.mesh, train_state.optimizer(t, run.model_cfg), task.loss_fn(run),
                           frozen_sh)
    # a LoRA run from a base checkpoint saves its adapters and a reference to the base
    base_ref = (checkpoint.adapter_base(init_from) if init_from and run.model_cfg.lora.enabled
                and cfg.checkpoint.adapters_only else None)
    ckpt = checkpoint.Checkpointer(checkpoint.as_path(cfg.checkpoint_dir), cfg.checkpoint.keep,
                                   cfg.checkpoint.async_save)
    report = None
    state = None
    try:
        state, start, meta = restore_or_init(trainer, ckpt, it, resume, init_from, console)
        report = _reporter(cfg, run, task, start, lambda: pipeline.check_counters(
            pipeline.counters(it.get_state()), data.reports, cfg.data.max_bad_fraction))
        last, evals, saved = dict(meta.get("last", {})), {}, start or None

        def save(step: int):
            nonlocal saved
            ckpt.save(step, state, config=cfg.to_dict(), tokenizer=run.tok.spec(), data_iter=it,
                      meta={"last": last, "data": pipeline.counters(it.get_state())}, base=base_ref)
            saved = step

        def good() -> str:
            return f"the last good checkpoint is step {saved} in {ckpt.directory}" if saved else "no checkpoint was saved"

        pending = None
        with StopSignals() as stop:
            for s in range(start, t.steps):
                local = next(it)
                if report.timer.starts_window():
                    jax.block_until_ready(state)  # time device-ready to device-ready
                    report.timer.start(s + 1)
                state, m = trainer(state, {k: local[k] for k in task.batch_keys}, frozen)
                if pending:  # metrics are fetched a step late, so dispatch stays ahead
                    last = report.step(*pending, good())
                pending = (s + 1, m)
                at_end = s + 1 == t.steps
                do_eval = at_end or (t.eval_every and (s + 1) % t.eval_every == 0)
                do_ckpt = at_end or (cfg.checkpoint.every and (s + 1) % cfg.checkpoint.every == 0)
                stopping = not at_end and stop.requested(s + 1)
                if do_eval or do_ckpt or stopping:  # never save or evaluate a state not checked finite
                    last, pending = report.step(*pending, good()), None
                if do_ckpt or stopping:
                    save(s + 1)
                if stopping:
                    ckpt.close()
                    raise Interrupted(f"stopped at step {s + 1} by {stop.name}; checkpoint saved in "
                                      f"{ckpt.directory}; resume with --resume", stop.exit_code)
                if do_eval:
                    evals = report.evaluation(s + 1, task.evaluate(run, state.params)) or evals
                if do_eval or do_ckpt:
                    report.timer.restart_after(s + 1)  # evaluating and saving are not throughput
            if pending:
                last = report.step(*pending, good())
    finally:
        if report:
            report.close()
        ckpt.close()
        close = getattr(it, "close", None)
        if close:
            close()
    return TrainResult(last=last, eval=evals, state=state, run=run,
                       data=pipeline.counters(it.get_state()) if hasattr(it, "get_state") else {})


def _reporter(cfg: RunConfig, run: Run, task, start: int, check_data) -> Reporter:
    main = jax.process_index() == 0
    peak, peak_src = peak_flops_per_device(cfg.log.peak_flops)
    if main:
        run.console.print(f"model {run.model_cfg.num_params / 1e6:.2f}M params; mesh {dict(run.mesh.shape)} on "
                          f"{jax.device_count()} {jax.devices()[0].platform} devices, {jax.process_count()} "
                          f"process(es); peak {peak / 1e12:.2f} TFLOP/s/device ({peak_src})")
    timer = StepTimer(tokens_per_step=task.rows(cfg) * cfg.data.seq_len,
                      flops_per_token=run.model_cfg.flops_per_token(cfg.data.seq_len), peak=peak)
    runlog = RunLog(run.log_dir, cfg.log.tensorboard, resume_step=start if start else None)
    progress = _Progress(run.console, cfg, start) if main else None
    return Reporter(run.console if main else None, runlog, timer, progress, train_state.schedule(cfg.train),
                    cfg.log.every, cfg.train.steps, check_data)


class _Progress:
    """A rich progress bar with ETA on terminals; nothing otherwise (log lines carry the news)."""

    def __init__(self, console: Console, cfg: RunConfig, start: int):
        self.bar = None
        if not (cfg.log.progress and console.is_terminal):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), console=console,
                            transient=True)
        self.task = self.bar.add_task("train", total=cfg.train.steps, completed=start, loss="-")
        self.bar.start()

    def update(self, step, loss):
        if self.bar:
            self.bar.update(self.task, completed=step, loss=f"{loss:.3f}")

    def close(self):
        if self.bar:
            self.bar.stop()
