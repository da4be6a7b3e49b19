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


def resolve(path) -> tuple[Path, int]:
    """A manager directory (latest step) or one step's folder -> (manager directory, step)."""
    p = Path(path)
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
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


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
    mngr = ocp.CheckpointManager(directory.absolute())
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
