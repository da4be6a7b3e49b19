"""Orbax checkpoints: one CheckpointManager directory, one numbered folder per saved step.

Each step holds separately restorable items:
  params       the model parameters (StandardSave; restored alone for eval / generate / convert)
  train_state  optimizer state, step and rng (training only)
  data         the grain iterator state (training only)
  config       the run's config as JSON (its `model` section rebuilds the model)
  tokenizer    the tokenizer spec as JSON (an HF tokenizer.json is embedded whole)
  meta         JSON: the last metrics, data counters, and a fingerprint of every array leaf

A LoRA run started from a base checkpoint saves only its adapters (`params` holds the `lora`
subtrees) and a reference to the base in `meta.base`: where it is and a digest of its fingerprints.
Every reader (`load_params`, `model_from_checkpoint`, `Checkpointer.restore`) joins the two, and
refuses a base that has changed since.

Fingerprints catch silent corruption (flipped bytes that still decode): each leaf's bit pattern is
summed with position weights modulo 2^32 on its devices (one pass, any sharding gives the same
number), stored at save and checked after every restore. A checkpoint that fails the check, or
cannot be read at all, is set aside and training resumes from the one before.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
from pathlib import Path
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from jaxlm import models, schema
from jaxlm.errors import CheckpointError
from jaxlm.model import lora
from jaxlm.pytree import path_str
from jaxlm.schema import field

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    SECTION: ClassVar[str] = "checkpoint"
    dir: str = field("", "checkpoint directory ('' = LOG_DIR/checkpoints)")
    every: int = field(500, "save every N steps (and at the end); 0 = only at the end", ge=0)
    keep: int = field(3, "checkpoints kept", ge=1)
    async_save: bool = field(True, "write checkpoints in the background")
    adapters_only: bool = field(True, "LoRA runs started from a base checkpoint (--init) save only the adapters and "
                                "a reference to the base")

    def __post_init__(self):
        schema.check(self)


def as_path(path):
    """A local path made absolute, or a URL (gs://...) as an epath that Orbax and file I/O accept."""
    from etils import epath

    return epath.Path(str(path)) if "://" in str(path) else Path(path).absolute()


def resolve(path) -> tuple[Path, int]:
    """A manager directory (latest step), one step's folder, or the NAME of a pulled pretrained
    model (jaxlm.models) -> (manager directory, step)."""
    p = as_path(path)
    if not p.exists() and models.lookup(str(path)) is not None:
        p = models.model_dir(str(path))
        if not models.is_pulled(str(path)):
            raise CheckpointError(f"model {path} is not downloaded (looked in {p})", hint=f"jaxlm pull {path}")
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


# ----------------------------------------------------------------------------- fingerprints
def _leaf_fingerprint(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}
                                        [x.dtype.itemsize]).astype(jnp.uint32).reshape(-1)
    weights = jnp.arange(bits.shape[0], dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


# one small program per leaf shape, dtype and sharding (jit's cache): a model has a handful, so a
# load compiles a few tiny reductions instead of one program over hundreds of leaves
_leaf_fingerprint_jit = jax.jit(_leaf_fingerprint)


def fingerprints(tree) -> dict[str, int]:
    """{leaf path: 32-bit fingerprint} of every array leaf (computed where the arrays live)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    fps = [(path_str(p), _leaf_fingerprint_jit(x)) for p, x in flat]
    return {name: int(np.asarray(v.addressable_data(0) if hasattr(v, "addressable_data") else v)) for name, v in fps}


def check_fingerprints(tree, saved: dict | None, what: str) -> None:
    """Raise CheckpointError naming the first leaf whose fingerprint differs from the saved one."""
    if not saved:
        return
    for name, value in fingerprints(tree).items():
        if name in saved and saved[name] != value:
            raise CheckpointError(f"{what}: array {name} does not match its fingerprint (the file is corrupt)")


def save_params(directory, params, config: dict, tokenizer: dict | None = None, step: int = 0):
    """Write params + config (+ tokenizer) as step `step` of a new or existing checkpoint directory."""
    mngr = manager(directory, async_save=False)
    if step in mngr.all_steps():
        mngr.close()
        raise CheckpointError(f"{directory} already holds a checkpoint at step {step}",
                              hint="choose another output, or pass --overwrite")
    items = {"params": ocp.args.StandardSave(params), "config": ocp.args.JsonSave(config),
             "meta": ocp.args.JsonSave({"fingerprints": {"params": fingerprints(params)}})}
    if tokenizer is not None:
        items["tokenizer"] = ocp.args.JsonSave(tokenizer)
    mngr.save(step, args=ocp.args.Composite(**items))
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


def converted_from(path) -> dict:
    """The `convert` section (model_type, name, ...) of a converted checkpoint, or of the base of an
    adapter-only one; {} when there is none."""
    directory, step = resolve(path)
    conv = (_read_json(directory, step, "config") or {}).get("convert")
    if conv:
        return conv
    base = (_read_json(directory, step, "meta") or {}).get("base")
    return converted_from(base["checkpoint"]) if base else {}


def load_tokenizer_spec(path) -> dict | None:
    directory, step = resolve(path)
    return _read_json(directory, step, "tokenizer")


# ----------------------------------------------------------------------------- adapter-only checkpoints
def _digest(directory, step) -> str:
    fps = (_read_json(directory, step, "meta") or {}).get("fingerprints", {}).get("params")
    return hashlib.sha256(json.dumps(fps, sort_keys=True).encode()).hexdigest()[:16]


def base_reference(path) -> dict:
    """What an adapter-only checkpoint records of its base: a model name, or the base's step folder,
    and a digest of the base's fingerprints."""
    directory, step = resolve(path)
    where = str(path) if models.lookup(str(path)) is not None else str(as_path(directory) / str(step))
    return {"checkpoint": where, "digest": _digest(directory, step)}


def adapter_base(path) -> dict | None:
    """The base a LoRA run initialised from checkpoint `path` can refer to: its own base when it is
    an adapter-only checkpoint, `path` itself when it has no adapters; None when it holds full
    params with adapters (then a run saves full params)."""
    directory, step = resolve(path)
    base = (_read_json(directory, step, "meta") or {}).get("base")
    if base:
        return base
    saved = (_read_json(directory, step, "config") or {}).get("model", {}) or {}
    return None if (saved.get("lora") or {}).get("rank", 0) else base_reference(path)


class BaseCheckpointError(CheckpointError):
    """The base of an adapter-only checkpoint is missing, unreadable or changed."""


def _load_base(ref: dict, shardings, what: str):
    try:
        directory, step = resolve(ref["checkpoint"])
        if _digest(directory, step) != ref.get("digest"):
            raise CheckpointError("it has changed since the adapters were saved (its fingerprints differ)")
        return load_params(ref["checkpoint"], shardings)
    except CheckpointError as e:
        raise BaseCheckpointError(f"{what} holds LoRA adapters whose base checkpoint {ref['checkpoint']} cannot be "
                                  f"used: {e}", hint="restore that base, or retrain the adapters") from None


def load_params(path, shardings=None):
    """Restore only the params of a checkpoint. With `shardings` (a pytree of jax.sharding.Sharding
    matching the params) each array is placed as the current mesh needs, whatever mesh wrote it.
    Quantised leaves (`is_quantized`) come back dequantised to float32. An adapter-only checkpoint
    comes back joined with its base."""
    directory, step = resolve(path)
    base = (_read_json(directory, step, "meta") or {}).get("base")
    if not base:
        return _restore_params(directory, step, shardings)
    base_sh, adapter_sh = lora.split(shardings) if shardings is not None else (None, None)
    adapters = _restore_params(directory, step, adapter_sh)
    return lora.join(_load_base(base, base_sh, f"checkpoint {directory}/{step}"), adapters)


def _restore_params(directory, step, shardings):
    mngr = _reader(directory)
    try:
        meta = mngr.item_metadata(step)["params"]
        tree = getattr(meta, "tree", meta)
        quantized = _has_quantized(tree)
        if shardings is None or quantized:  # quantised: dequantised on the host, then placed
            dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            stored_shardings = jax.tree.map(lambda _: dev, tree)
        else:
            stored_shardings = shardings
        abstract = jax.tree.map(lambda m, s: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=s), tree,
                                stored_shardings)
        restored = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(abstract)))
    except Exception as e:  # noqa: BLE001 - Orbax raises many kinds for a damaged checkpoint
        raise CheckpointError(f"checkpoint {directory}/{step} cannot be read ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
    finally:
        mngr.close()
    meta = _read_json(directory, step, "meta") or {}
    check_fingerprints(restored["params"], meta.get("fingerprints", {}).get("params"), f"checkpoint {directory}/{step}")
    params = restored["params"]
    if quantized:
        if shardings is None:
            params = dequantize_tree(params, jnp.asarray)
        else:
            params = jax.device_put(dequantize_tree(params), shardings)
    return params


# ----------------------------------------------------------------------------- quantised storage
QUANT_KEYS = frozenset({"codes", "scale", "offset"})


def is_quantized(node) -> bool:
    """A quantised weight: {"codes": int8 [...], "scale": f16, "offset": f16}, the scales with one
    axis shorter by the block size; the weight is codes * scale + offset, each scale and offset
    repeated over its block (the form of GGUF's Q8_0, Q4_0 and Q4_1 blocks, jaxlm.convert.gguf)."""
    return isinstance(node, dict) and set(node) == QUANT_KEYS


def _has_quantized(tree) -> bool:
    if is_quantized(tree):
        return True
    return isinstance(tree, dict) and any(_has_quantized(v) for v in tree.values())


def dequantize(node) -> np.ndarray:
    """The float32 weight of a quantised leaf, computed in numpy as gguf's dequantiser does
    (float32 d * q, then + m), so the values equal it bit for bit."""
    codes = np.asarray(node["codes"])
    scale = np.asarray(node["scale"]).astype(np.float32)
    offset = np.asarray(node["offset"]).astype(np.float32)
    axis = next((i for i, (n, m) in enumerate(zip(codes.shape, scale.shape)) if n != m), None)
    if axis is None:
        return codes.astype(np.float32) * scale + offset
    block = codes.shape[axis] // scale.shape[axis]
    blocked = codes.shape[:axis] + (scale.shape[axis], block) + codes.shape[axis + 1:]
    w = codes.reshape(blocked).astype(np.float32)
    w *= np.expand_dims(scale, axis + 1)
    w += np.expand_dims(offset, axis + 1)
    return w.reshape(codes.shape)


def dequantize_tree(tree, place=lambda x: x):
    """Every quantised leaf dequantised (and handed to `place`, leaf by leaf, so that only one
    float32 host copy exists at a time)."""
    if is_quantized(tree):
        return place(dequantize(tree))
    if isinstance(tree, dict):
        return {k: dequantize_tree(v, place) for k, v in tree.items()}
    return tree


def model_from_checkpoint(path, shardings=None):
    """(ModelConfig, params, tokenizer spec or None) of a checkpoint: its `model` section rebuilds
    the model, its tokenizer item (or the config's data.tokenizer) gives the tokenizer."""
    from jaxlm.model.config import ModelConfig

    saved = load_config(path)
    model_cfg = ModelConfig.from_dict(saved.get("model", {}))
    params = load_params(path, shardings)
    spec = load_tokenizer_spec(path) or (saved.get("data", {}) or {}).get("tokenizer") or None
    return model_cfg, params, spec


def to_numpy(tree):
    return jax.tree.map(np.asarray, tree)


class _quiet_orbax:  # noqa: N801 - a context manager
    """Orbax's failed reads leave coroutines that Python reports one by one at garbage collection
    ("Exception ignored in coroutine ..."); the failure itself is reported once by the caller."""

    def __enter__(self):
        self._hook = sys.unraisablehook
        sys.unraisablehook = lambda unraisable: None
        return self

    def __exit__(self, *exc):
        import gc

        gc.collect()
        sys.unraisablehook = self._hook


class Checkpointer:
    """Training checkpoints: async saves, keep N, restore with the current mesh's shardings, and
    fall back to the previous step when the latest cannot be read."""

    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        self.directory = as_path(directory)
        self.mngr = manager(self.directory, max_to_keep=keep, async_save=async_save)

    def steps(self) -> list[int]:
        return sorted(self.mngr.all_steps())

    def save(self, step: int, state, *, config: dict, tokenizer: dict | None, data_iter=None,
             meta: dict | None = None, base: dict | None = None):
        """Save asynchronously (the arrays are copied first). The caller saves only a state it has
        checked to be finite (jaxlm.train.steps commits no non-finite update). With `base` (a
        `base_reference`) only the adapters of the params are written, and the reference."""
        import grain

        rest = {"step": state.step, "opt_state": state.opt_state, "rng": state.rng}
        params = lora.split(state.params)[1] if base else state.params
        meta = dict(meta or {}, fingerprints={"params": fingerprints(params), "train_state": fingerprints(rest)})
        if base:
            meta["base"] = base
        items = {
            "params": ocp.args.StandardSave(params),
            "train_state": ocp.args.StandardSave(rest),
            "config": ocp.args.JsonSave(config),
            "meta": ocp.args.JsonSave(meta),
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

        full = jax.tree.map(spec, abstract_state.params)
        rest = jax.tree.map(spec, {"step": abstract_state.step, "opt_state": abstract_state.opt_state,
                                   "rng": abstract_state.rng})
        unreadable = []
        for step in reversed(self.steps()):
            base = (_read_json(self.directory, step, "meta") or {}).get("base")
            base_abstract, params = lora.split(full) if base else (None, full)
            items = {"params": ocp.args.StandardRestore(params), "train_state": ocp.args.StandardRestore(rest),
                     "meta": ocp.args.JsonRestore()}
            if data_iter is not None:
                items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
            try:
                with _quiet_orbax():
                    r = self.mngr.restore(step, args=ocp.args.Composite(**items))
                fps = (r["meta"] or {}).get("fingerprints", {})
                where = f"checkpoint step {step}"
                check_fingerprints(r["params"], fps.get("params"), where)
                check_fingerprints(r["train_state"], fps.get("train_state"), where)
                restored_params = r["params"]
                if base:
                    restored_params = lora.join(_load_base(base, jax.tree.map(lambda x: x.sharding, base_abstract),
                                                           where), restored_params)
            except BaseCheckpointError:  # the base is gone or changed: no older step can help
                raise
            except Exception as e:  # noqa: BLE001 - any unreadable or corrupt checkpoint: try the one before
                msg = str(e).splitlines()[0][:200] if str(e) else ""
                log.warning("checkpoint step %d in %s cannot be restored (%s: %s); falling back to the "
                            "previous one", step, self.directory, type(e).__name__, msg)
                unreadable.append(step)
                continue
            self._set_aside(unreadable)
            ts = r["train_state"]
            state = abstract_state.replace(params=restored_params, step=ts["step"], opt_state=ts["opt_state"],
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

    def close(self):
        self.mngr.wait_until_finished()
        self.mngr.close()
