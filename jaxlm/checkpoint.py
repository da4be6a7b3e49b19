"""Orbax checkpoints: one CheckpointManager directory, one numbered folder per saved step.

Each step holds separately restorable items:
  params       the model parameters (StandardSave; restored alone for eval / generate / convert)
  train_state  optimizer state, step and rng (training only)
  data         the grain iterator state (training only)
  config       the run's config as JSON (its `model` section rebuilds the model)
  tokenizer    the tokenizer spec as JSON (an HF tokenizer.json is embedded whole)
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def as_path(path):
    """A local path made absolute, or a URL (gs://...) as an epath that Orbax and file I/O accept."""
    from etils import epath

    return epath.Path(str(path)) if "://" in str(path) else Path(path).absolute()


def resolve(path) -> tuple[Path, int]:
    """A manager directory (latest step) or one step's folder -> (manager directory, step)."""
    p = as_path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if (p / "_CHECKPOINT_METADATA").exists() or (p / "params").is_dir():
        if not p.name.isdigit():
            raise CheckpointError(f"{p} looks like a checkpoint step but its name is not a step number")
        return p.parent, int(p.name)
    steps = sorted(int(s.name) for s in p.iterdir() if s.name.isdigit() and (s / "params").is_dir())
    if not steps:
        raise CheckpointError(f"no checkpoint steps under {p}")
    return p, steps[-1]


def manager(directory, max_to_keep: int | None = None, async_save: bool = True) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=async_save,
                                           create=True)
    return ocp.CheckpointManager(as_path(directory), options=options)


def _reader(directory) -> ocp.CheckpointManager:
    """A manager that knows every item's handler (so reading one item warns about none)."""
    import grain

    handlers = {"params": ocp.StandardCheckpointHandler(), "train_state": ocp.StandardCheckpointHandler(),
                "config": ocp.JsonCheckpointHandler(), "meta": ocp.JsonCheckpointHandler(),
                "tokenizer": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
    return ocp.CheckpointManager(as_path(directory), item_handlers=handlers)


def save_args(params, config: dict, tokenizer: dict | None = None, train_state=None, data=None):
    items = {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(config)}
    if tokenizer is not None:
        items["tokenizer"] = ocp.args.JsonSave(tokenizer)
    if train_state is not None:
        items["train_state"] = ocp.args.StandardSave(train_state)
    if data is not None:
        items["data"] = data
    return ocp.args.Composite(**items)


def save_params(directory, params, config: dict, tokenizer: dict | None = None, step: int = 0):
    """Write params + config (+ tokenizer) as step `step` of a new or existing checkpoint directory."""
    mngr = manager(directory, async_save=False)
    mngr.save(step, args=save_args(params, config, tokenizer), force=True)
    mngr.wait_until_finished()
    mngr.close()


def _read_json(directory: Path, step: int, item: str):
    f = directory / str(step) / item / "metadata"
    return json.loads(f.read_text()) if f.exists() else None


def load_config(path) -> dict:
    directory, step = resolve(path)
    cfg = _read_json(directory, step, "config")
    if cfg is None:
        raise CheckpointError(f"checkpoint {directory}/{step} has no config item")
    return cfg


def load_tokenizer_spec(path) -> dict | None:
    directory, step = resolve(path)
    return _read_json(directory, step, "tokenizer")


def load_params(path, shardings=None):
    """Restore only the params of a checkpoint. With `shardings` (a pytree of jax.sharding.Sharding
    matching the params) each array is placed as the current mesh needs, whatever mesh wrote it."""
    directory, step = resolve(path)
    mngr = _reader(directory)
    try:
        meta = mngr.item_metadata(step)["params"]
        tree = getattr(meta, "tree", meta)
        if shardings is None:
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            shardings = jax.tree.map(lambda _: dev, tree)
        abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree, shardings)
        restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    finally:
        mngr.close()
    return restored["params"]


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


class Checkpointer:
    """Training checkpoints: async saves, keep N, restore with the current mesh's shardings, and
    fall back to the previous step when the latest cannot be read."""

    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)
        self.mngr = manager(self.directory, max_to_keep=keep, async_save=async_save)

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state, *, config: dict, tokenizer: dict | None, data_iter=None,
             meta: dict | None = None):
        import grain

        items = {
            "params": ocp.args.StandardSave(state.params),
            "train_state": ocp.args.StandardSave({"step": state.step, "opt_state": state.opt_state,
                                                  "rng": state.rng}),
            "config": ocp.args.JsonSave(config),
            "meta": ocp.args.JsonSave(meta or {}),
        }
        if tokenizer is not None:
            items["tokenizer"] = ocp.args.JsonSave(tokenizer)
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iter)
        self.mngr.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, data_iter=None):
        """(state, meta, step) from the newest readable checkpoint, or None when there is none.
        abstract_state: a TrainState of jax.ShapeDtypeStruct carrying the target shardings."""
        import grain

        def spec(x):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

        params = jax.tree.map(spec, abstract_state.params)
        rest = jax.tree.map(spec, {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                                   "rng": abstract_state.rng})
        unreadable = []
        for step in reversed(self.steps()):
            items = {"params": ocp.args.StandardRestore(params), "train_state": ocp.args.StandardRestore(rest),
                     "meta": ocp.args.JsonRestore()}
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                r = self.mngr.restore(step, args=ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint: try the one before
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); falling back to the "
                            "previous one", step, self.directory, type(e).__name__, str(e).splitlines()[0][:200])
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            ts = r["train_state"]
            state = abstract_state.replace(params=r["params"], step=ts["step"], opt_state=ts["opt_state"],
                                           rng=ts["rng"])
            return state, r["meta"] or {}, step
        return None

    def _set_aside(self, steps):
        """Rename unreadable steps to STEP.unreadable (kept for inspection, invisible to Orbax), so
        the resumed run can save those steps again."""
        if not steps:
            return
        if jax.process_index() == 0:
            for s in steps:
                src = self.directory / str(s)
                dst = self.directory / f"{s}.unreadable"
                n = 1
                while dst.exists():
                    dst, n = self.directory / f"{s}.unreadable{n}", n + 1
                src.rename(dst)
                log.warning("moved unreadable checkpoint %s to %s", src, dst)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("jaxlm checkpoint set aside")
        self.mngr.reload()

    def wait(self):
        self.mngr.wait_until_finished()

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()
