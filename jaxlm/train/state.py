"""TrainState and the optimizer: AdamW, warmup + cosine/linear schedules, global-norm clipping,
decoupled weight decay on matrices only, and trainable-parameter masks (LoRA, preference training)."""

from __future__ import annotations

import re
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.model.lora import TRAINABLE as LORA_TRAINABLE
from jaxlm.pytree import path_str


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def schedule(t) -> optax.Schedule:
    """Linear warmup from 0 to t.lr over t.warmup_steps, then cosine or linear decay to
    t.lr * t.min_lr_ratio at t.steps, or constant."""
    warm = max(int(t.warmup_steps), 0)
    decay_steps = max(int(t.steps) - warm, 1)
    end = t.lr * t.min_lr_ratio
    if t.schedule == "cosine":
        after = optax.cosine_decay_schedule(t.lr, decay_steps, alpha=t.min_lr_ratio)
    elif t.schedule == "linear":
        after = optax.linear_schedule(t.lr, end, decay_steps)
    else:
        after = optax.constant_schedule(t.lr)
    if not warm:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, t.lr, warm), after], [warm])


def trainable_mask(params, pattern: str):
    """True for parameters whose path ('layers/attn/q', 'embedding', ...) matches `pattern`
    (re.search); everything when pattern is ''."""
    if not pattern:
        return jax.tree.map(lambda _: True, params)
    rx = re.compile(pattern)
    return jax.tree_util.tree_map_with_path(lambda p, _: bool(rx.search(path_str(p))), params)


def _decay_mask(params):
    # no weight decay on norm scales (vectors); a scanned norm has shape [layers, d]
    return jax.tree_util.tree_map_with_path(lambda p, x: "norm" not in path_str(p) and x.ndim >= 2, params)


def trainable_pattern(t, model_cfg=None) -> str:
    """train.trainable, or with LoRA adapters and no explicit pattern, the adapters alone."""
    if not t.trainable and model_cfg is not None and model_cfg.lora.enabled:
        return LORA_TRAINABLE
    return t.trainable


def optimizer(t, model_cfg=None) -> optax.GradientTransformation:
    """AdamW with clipping; frozen parameters (train.trainable; with LoRA by default everything but the
    adapters) get no update and no optimizer state. Gradient accumulation is done by the step itself
    (exact per-token mean over the whole batch)."""
    adamw = optax.adamw(schedule(t), b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                        mask=_decay_mask)
    tx = optax.chain(optax.clip_by_global_norm(t.clip_norm), adamw) if t.clip_norm else adamw
    pattern = trainable_pattern(t, model_cfg)
    if pattern:
        def labels(params):
            return jax.tree.map(lambda m: "train" if m else "frozen", trainable_mask(params, pattern))
        tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
    return tx


def create(model_init, tx, rng) -> TrainState:
    """Initial state with boxed (logically partitioned) params: pass it to jax.eval_shape to get
    shardings with nn.get_partition_spec, and unbox it inside the jitted initialiser."""
    param_rng, rng = jax.random.split(rng)
    params = model_init(param_rng)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)


def unboxed(state: TrainState) -> TrainState:
    return nn.meta.unbox(state)
