"""Sweeps: a grid of runs from one config, run one after another here (`jaxlm sweep run`) or written
out as launch commands for a pod or a cluster (`jaxlm sweep launch`).

A sweep file is a Python file whose `get_config()` returns an ml_collections ConfigDict:

    name      the sweep's name            base     the config every run starts from
    command   train | align               init     --init checkpoint for every run ('' = none)
    dir       run folders + results.jsonl  record   what a finished run adds to the results table:
                                                   lm | multilingual | align (see RECORDERS)
    fixed     overrides for every run: ((field, value), ...)
    points    the grid: a tuple of points, each a tuple of (field, value) pairs (use `product`)
    prepare   optional ((output, kind, {arguments}), ...) made once when `output` is missing; kinds:
              "tokenizer" (jaxlm.data.pipeline.train_tokenizer: data, vocab_size, max_records, text_field)
    analysis  for record=align: prompts, n, max_new_tokens, samples

Finished runs are recorded in DIR/results.jsonl and skipped when the sweep is run again; a run that
was interrupted resumes from its last checkpoint.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path

import jax
import ml_collections
from rich.markup import escape

from jaxlm import checkpoint
from jaxlm import config as run_config
from jaxlm.align import analysis
from jaxlm.align.train import AlignTask
from jaxlm.data.pipeline import train_tokenizer
from jaxlm.data.sources import parse_spec
from jaxlm.errors import ConfigError
from jaxlm.infer.generate import generate
from jaxlm.train.config import RunConfig
from jaxlm.train.loop import TrainResult, train


# ----------------------------------------------------------------------------- building grids
def axis(field: str, values: Sequence) -> list[tuple]:
    """One axis: each value becomes a point ((field, value),)."""
    return [((field, v),) for v in values]


def named(points: dict) -> list[tuple]:
    """Points that set several fields at once: {label: {field: value, ...}}; the run name shows the label
    (its fields are stored as ~field so that only the label names the run)."""
    return [(("point", label),) + tuple((f"~{f}", v) for f, v in fields.items()) for label, fields in points.items()]


def overrides(point) -> list[tuple]:
    """(field, value) pairs of a point, without labels."""
    return [(f.lstrip("~"), v) for f, v in point if f != "point"]


def product(*axes) -> tuple:
    """The cartesian product of axes (lists of points)."""
    return tuple(sum(combo, ()) for combo in itertools.product(*axes))


def load(spec: str) -> ml_collections.ConfigDict:
    """A sweep file `configs/sweeps/x.py[:arg]` (its get_config(arg) receives what follows the colon)."""
    path_text, _, arg = spec.partition(":")
    path = Path(path_text)
    if not path.exists():
        raise ConfigError(f"sweep file {path} not found")
    mod_spec = importlib.util.spec_from_file_location(f"_jaxlm_sweep_{path.stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    s = module.get_config(arg) if arg else module.get_config()
    for k in ("name", "base", "command", "dir", "points", "record"):
        if k not in s:
            raise ConfigError(f"sweep {spec} has no {k!r}")
    if s.command not in ("train", "align"):
        raise ConfigError(f"sweep.command must be train | align, got {s.command!r}")
    if s.record not in RECORDERS:
        raise ConfigError(f"sweep.record must be one of {sorted(RECORDERS)}, got {s.record!r}")
    return s


def run_name(point) -> str:
    parts = []
    for field, value in point:
        if field == "point":
            parts.append(str(value))
        elif field.startswith("~"):
            continue
        elif not isinstance(value, str) or len(value) < 24:
            parts.append(f"{field.split('.')[-1]}{value}")
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", "-".join(parts))


def point_config(s, point) -> RunConfig:
    """The validated config of one run: the base, the fixed overrides, the point's, its own log.dir."""
    items = list(s.get("fixed", ())) + overrides(point)
    items += [("log.dir", str(Path(s.dir) / run_name(point))), ("log.progress", False)]
    return run_config.load(s.base, [f"--config.{field}={_text(value)}" for field, value in items])


def _text(v) -> str:
    return v if isinstance(v, str) else str(v).lower() if isinstance(v, bool) else repr(v)


# ----------------------------------------------------------------------------- results
def finished(results: Path) -> set[str]:
    if not results.exists():
        return set()
    return {json.loads(line)["run"] for line in open(results) if line.strip()}


def record_lm(s, cfg: RunConfig, point, result: TrainResult) -> list[dict]:
    m = cfg.model
    ev = result.eval
    return [{"N": m.num_non_embedding_params, "D": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
             "lr": cfg.train.lr, "loss": ev.get("loss"), "ppl": ev.get("ppl")}]


def family_shares(spec: str, families: dict) -> dict:
    """Token shares by family of a data.train spec whose paths are language files (xx.jsonl)."""
    shares: dict = {}
    specs = parse_spec(spec)
    total = sum(x.weight for x in specs)
    for x in specs:
        lang = Path(x.path).name.split(".")[0]
        fam = families.get(lang, lang)
        shares[fam] = shares.get(fam, 0.0) + x.weight / total
    return shares


def record_multilingual(s, cfg: RunConfig, point, result: TrainResult) -> list[dict]:
    """One row per language family: family, N, D, p (its token share), loss (its held-out loss), and
    the whole mixture as p_<family> columns (for the independence check)."""
    families = json.loads(Path(s.families).read_text())
    shares = family_shares(cfg.data.train, families)
    m = cfg.model
    base = {"N": m.num_non_embedding_params, "D": cfg.train.steps * cfg.train.batch_size * cfg.data.seq_len,
            "mixture": ",".join(f"{f}={p:.3f}" for f, p in sorted(shares.items())),
            **{f"p_{f}": round(p, 6) for f, p in shares.items()}}
    rows = []
    for fam, g in sorted(result.eval.get("groups", {}).items()):
        if fam in shares:
            rows.append({**base, "family": fam, "p": round(shares[fam], 6), "loss": g["loss"]})
    return rows


def record_align(s, cfg: RunConfig, point, result: TrainResult) -> list[dict]:
    """Held-out reward accuracy and margins, then KL(policy || reference) and response lengths."""
    ev = result.eval
    row = {"loss_type": cfg.align.loss, "beta": cfg.align.beta, "lr": cfg.train.lr,
           "accuracy": ev.get("rewards/accuracies"), "margin": ev.get("rewards/margins"), "eval_loss": ev.get("loss")}
    a = s.get("analysis")
    if a and s.get("init"):
        tok = result.run.tok
        model_cfg = result.run.model_cfg
        policy = jax.device_get(result.state.params)
        ref = checkpoint.load_params(s.init)
        prompts = analysis.read_prompts(a.prompts, tok, "prompt", a.n)

        def sample(batch, seed):
            return generate(model_cfg, policy, batch, max_new_tokens=a.max_new_tokens, temperature=1.0,
                            stop_tokens=tok.stop_ids, seed=seed).tokens

        an = analysis.analyze(model_cfg, policy, ref, prompts, sample, samples=a.samples, stop_tokens=tok.stop_ids,
                              seed=cfg.train.seed, max_prompt=a.get("max_prompt", 192))
        row.update(an.summary())
    return [row]


RECORDERS = {"lm": record_lm, "multilingual": record_multilingual, "align": record_align}


# ----------------------------------------------------------------------------- running
def _prepare_tokenizer(output: str, data: str, vocab_size: int, max_records: int = 0, text_field: str = "text"):
    tok = train_tokenizer(data, vocab_size, text_field=text_field, max_records=max_records)
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    tok.save(output)


PREPARERS = {"tokenizer": _prepare_tokenizer}


def prepare(s, console):
    """Make every missing `prepare` output (e.g. the sweep's tokenizer) once."""
    for output, kind, kwargs in s.get("prepare", ()):
        if Path(output).exists():
            continue
        if kind not in PREPARERS:
            raise ConfigError(f"sweep.prepare kind {kind!r} is unknown; choose from {sorted(PREPARERS)}")
        console.print(f"[dim]sweep[/dim] preparing {escape(output)} ({kind})")
        PREPARERS[kind](output, **dict(kwargs))


def run(s, console) -> Path:
    """Run every unfinished point in order; append its rows to DIR/results.jsonl."""
    out = Path(s.dir)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    prepare(s, console)
    done = finished(results)
    points = list(s.points)
    for n, point in enumerate(points, 1):
        name = run_name(point)
        if name in done:
            console.print(f"[dim]sweep {n}/{len(points)} {escape(name)}: done, skipped[/dim]")
            continue
        cfg = point_config(s, point)
        resume = (Path(cfg.log.dir) / "checkpoints").is_dir() and any(
            p.name.isdigit() for p in (Path(cfg.log.dir) / "checkpoints").iterdir())
        console.print(f"[bold]sweep {n}/{len(points)} {escape(name)}[/bold]" + (" (resuming)" if resume else ""))
        init = s.get("init") or None
        task = AlignTask(cfg, init) if s.command == "align" else None
        result = train(cfg, resume=resume, init_from=init, task=task, console=console)
        rows = RECORDERS[s.record](s, cfg, point, result)
        if jax.process_index() == 0:
            with open(results, "a") as f:
                for row in rows:
                    f.write(json.dumps({"run": name, **dict(overrides(point)), **row}) + "\n")
        del result
    return results


LAUNCH_HEADER = {
    "tpu": ': "${TPU_NAME:?the TPU (launch/tpu_pod.sh --name)}" "${TPU_ZONE:?its zone}" '
           '"${TPU_RUN:?the --run-name that launch/tpu_pod.sh setup printed}" "${GCS:?gs://bucket/path for logs and checkpoints}"\n'
           'TPU_ARGS=(${TPU_ARGS:-})  # more launch/tpu_pod.sh options, e.g. TPU_ARGS="--project P --internal-ip"',
    "slurm": 'SLURM_ARGS=(${SLURM_ARGS:---nodes 1 --gpus-per-node 8})  # e.g. SLURM_ARGS="--nodes 2 --partition gpu"',
}


def launch_commands(s, target: str, sweep_file: str) -> list[str]:
    """One launcher command per unfinished run: `launch/tpu_pod.sh train` (runs one after another on a
    TPU set up once, logs and checkpoints under $GCS) or `launch/gpu_slurm.sh` (one job per run).
    The runs train exactly as `jaxlm sweep run` would; their rows are written by `sweep run` only, so
    evaluate them there (it skips nothing it has no row for) or read each run's metrics.jsonl."""
    if target not in LAUNCH_HEADER:
        raise ValueError(f"unknown launch target {target!r} (tpu, slurm)")
    done = finished(Path(s.dir) / "results.jsonl")
    cmds = []
    for point in s.points:
        name = run_name(point)
        if name in done:
            continue
        args = [f"--config.{field}={_text(value)}" for field, value in list(s.get("fixed", ())) + overrides(point)]
        if s.get("init"):
            args += ["--init", s.init]
        run_dir = Path(s.dir) / name
        if target == "tpu":
            head = (f'launch/tpu_pod.sh train "${{TPU_ARGS[@]}}" --name "$TPU_NAME" --zone "$TPU_ZONE" --run-name "$TPU_RUN" --gcs "$GCS" '
                    f"--command {s.command} --config {shlex.quote(s.base)} -- ")
            dirs = f'"--config.log.dir=$GCS/{run_dir}" "--config.checkpoint.dir=$GCS/{run_dir}/checkpoints"'
        else:
            head = f'launch/gpu_slurm.sh "${{SLURM_ARGS[@]}}" --job-name {shlex.quote(name)} --command {s.command} -- '
            head += f"--config {shlex.quote(s.base)} "
            dirs = shlex.quote(f"--config.log.dir={run_dir}")
        cmds.append(f"{head}{shlex.join(args)} {dirs}  # sweep {s.name} ({sweep_file}) run {name}")
    return cmds
