"""Pure training and evaluation steps.

The loss is next-token cross-entropy over `loss_mask`, reduced per token over the whole global
batch (gradient accumulation sums token-weighted gradients, so it equals one big batch). Log-probs
come from a sequence-chunked log-softmax under `jax.checkpoint`: only [B, chunk, V] logits exist at
any time, forward or backward, so a 200K vocabulary never materialises fp32 logits for the batch.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from jaxlm.model import Decoder, ModelConfig
from jaxlm.train.state import TrainState, trainable_mask


def token_logprobs(config: ModelConfig, params, hidden, targets, chunk: int = 256):
    """log p(targets[b, t] | prefix) from final hidden states [B, T, d] -> [B, T] float32."""
    b, t, _ = hidden.shape
    chunk = t if not chunk or chunk >= t else chunk
    pad = -t % chunk
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
    n = (t + pad) // chunk
    model = Decoder(config)

    @jax.checkpoint
    def one(h, y):
        logits = model.apply({"params": params}, h, method=Decoder.logits)  # [B, c, V] float32
        lse = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
        return picked - lse

    hs = hidden.reshape(b, n, chunk, -1).swapaxes(0, 1)
    ys = targets.reshape(b, n, chunk).swapaxes(0, 1)
    lp = jax.lax.map(lambda xs: one(*xs), (hs, ys))
    return lp.swapaxes(0, 1).reshape(b, n * chunk)[:, :t]


def hidden_states(config: ModelConfig, params, batch, rng=None):
    """Final hidden states [B, T, d]; a batch's `adapter_ids` routes its rows (LoRA), and `rng` turns
    on the adapters' dropout (training)."""
    return Decoder(config).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                 return_hidden=True, adapter_ids=batch.get("adapter_ids"),
                                 rngs=None if rng is None else {"dropout": rng})


def uses_dropout(config: ModelConfig) -> bool:
    """Whether training needs a dropout rng (LoRA adapters with dropout)."""
    lc = config.lora
    return lc.enabled and any(x > 0 for x in (lc.dropouts or (lc.dropout,)))


def nll_sums(config: ModelConfig, params, batch, chunk: int, rng=None):
    """(summed NLL over loss_mask, number of loss tokens) for one batch."""
    lp = token_logprobs(config, params, hidden_states(config, params, batch, rng), batch["targets"], chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -(lp * mask).sum(), mask.sum()


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, grad_accum: int = 1,
                    chunk: int = 256, loss_fn=None, trainable: str = ""):
    """(state, batch, frozen=None) -> (state, metrics).

    `loss_fn(params, batch, frozen) -> (summed loss, weight, aux dict of sums)` defaults to the LM
    loss (summed NLL, loss-token count); preference training passes its own, with the frozen
    reference params as `frozen`. Gradients of the sums are accumulated over `grad_accum`
    micro-batches and divided by the total weight once. With LoRA dropout the loss also gets a
    fresh `rng` per step and micro-batch: loss_fn(params, batch, frozen, rng).

    `trainable` (a train.trainable pattern; with LoRA, the adapters): gradients are taken with respect
    to the matching params only, so no weight gradient of a frozen layer is ever computed (the
    optimizer, built with the same pattern, gives frozen params no update), and frozen params pass
    through the step untouched, bit for bit.
    """
    dropout = uses_dropout(config)
    if loss_fn is None:
        def loss_fn(params, batch, frozen, rng=None):
            total, n = nll_sums(config, params, batch, chunk, rng)
            return total, n, {}

    def split(params):
        """(mask, trainable part): the part has None where a param is frozen."""
        mask = trainable_mask(params, trainable)
        return mask, jax.tree.map(lambda m, x: x if m else None, mask, params)

    def value_and_grad(params, batch, frozen, rng):
        mask, train = split(params)

        def f(t):
            p = jax.tree.map(lambda m, x, full: x if m else full, mask, t, params)
            total, n, aux = loss_fn(p, batch, frozen, rng) if dropout else loss_fn(p, batch, frozen)
            return total, (n, aux)
        (total, (n, aux)), g = jax.value_and_grad(f, has_aux=True)(train)
        return g, total, n, aux

    def step(state: TrainState, batch, frozen=None):
        params = state.params
        mask = split(params)[0]
        rng = jax.random.fold_in(state.rng, state.step) if dropout else None
        if grad_accum == 1:
            grads, total, n, aux = value_and_grad(params, batch, frozen, rng)
        else:
            mb = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, xs):
                b, i = xs
                r = None if rng is None else jax.random.fold_in(rng, i)
                return jax.tree.map(jnp.add, carry, value_and_grad(params, b, frozen, r)), None

            first = jax.tree.map(lambda x: x[0], mb)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(value_and_grad, params, first, frozen, rng))
            (grads, total, n, aux), _ = jax.lax.scan(body, zeros, (mb, jnp.arange(grad_accum)))
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)  # trainable params only (None where frozen)
        full_grads = jax.tree.map(lambda m, g, x: g if m else jnp.zeros_like(x), mask, grads, params)
        updates, opt_state = tx.update(full_grads, state.opt_state, params)
        updates = jax.tree.map(lambda m, u: u if m else None, mask, updates)
        new_params = jax.tree.map(lambda m, x, u: optax.apply_updates(x, u) if m else None, mask, params, updates)
        # commit only a finite update: a NaN/inf loss, gradient, update, parameter or optimizer moment
        # leaves the state as it was (the loop then stops, naming the step), so no checkpoint can hold it
        finite = all_finite((total, grads, new_params, opt_state))
        metrics = {"loss": total / denom, "grad_norm": optax.global_norm(grads),
                   "update_norm": optax.global_norm(updates), "tokens": n, "finite": finite,
                   **{k: v / denom for k, v in aux.items()}}
        keep = functools.partial(jnp.where, finite)
        new_params = jax.tree.map(lambda m, x, new: keep(new, x) if m else x, mask, params, new_params)
        new = state.replace(step=keep(state.step + 1, state.step), opt_state=jax.tree.map(keep, opt_state, state.opt_state))
        return new.replace(params=new_params), metrics

    return step


def all_finite(tree) -> jax.Array:
    """True when every floating-point leaf of `tree` is finite (one pass over the arrays)."""
    ok = jnp.asarray(True)
    for x in jax.tree.leaves(tree):
        if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact):
            ok = ok & jnp.all(jnp.isfinite(x))
    return ok


def make_eval_step(config: ModelConfig, chunk: int = 256, num_groups: int = 1):
    """(params, batch) -> per-group summed NLL and token counts, [num_groups] each."""
    def step(params, batch):
        lp = token_logprobs(config, params, hidden_states(config, params, batch), batch["targets"], chunk)
        mask = batch["loss_mask"].astype(jnp.float32)
        onehot = jax.nn.one_hot(batch["group"], num_groups, dtype=jnp.float32) * mask[..., None]
        return -jnp.einsum("bt,btg->g", lp, onehot), onehot.sum(axis=(0, 1))
    return step
