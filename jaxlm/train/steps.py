"""Pure training and evaluation steps.

The loss is next-token cross-entropy over `loss_mask`, reduced per token over the whole global
batch (gradient accumulation sums token-weighted gradients, so it equals one big batch). Log-probs
come from a sequence-chunked log-softmax under `jax.checkpoint`: only [B, chunk, V] logits exist at
any time, forward or backward, so a 200K vocabulary never materialises fp32 logits for the batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxlm.model import Decoder, ModelConfig
from jaxlm.train.state import TrainState


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


def hidden_states(config: ModelConfig, params, batch):
    return Decoder(config).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"],
                                 return_hidden=True)


def nll_sums(config: ModelConfig, params, batch, chunk: int):
    """(summed NLL over loss_mask, number of loss tokens) for one batch."""
    lp = token_logprobs(config, params, hidden_states(config, params, batch), batch["targets"], chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return -(lp * mask).sum(), mask.sum()


def make_train_step(config: ModelConfig, tx: optax.GradientTransformation, grad_accum: int = 1,
                    chunk: int = 256, loss_fn=None):
    """(state, batch, frozen=None) -> (state, metrics).

    `loss_fn(params, batch, frozen) -> (summed loss, weight, aux dict of sums)` defaults to the LM
    loss (summed NLL, loss-token count); preference training passes its own, with the frozen
    reference params as `frozen`. Gradients of the sums are accumulated over `grad_accum`
    micro-batches and divided by the total weight once.
    """
    if loss_fn is None:
        def loss_fn(params, batch, frozen):
            total, n = nll_sums(config, params, batch, chunk)
            return total, n, {}

    def value_and_grad(params, batch, frozen):
        def f(p):
            total, n, aux = loss_fn(p, batch, frozen)
            return total, (n, aux)
        (total, (n, aux)), g = jax.value_and_grad(f, has_aux=True)(params)
        return g, total, n, aux

    def step(state: TrainState, batch, frozen=None):
        params = state.params
        if grad_accum == 1:
            grads, total, n, aux = value_and_grad(params, batch, frozen)
        else:
            mb = jax.tree.map(lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

            def body(carry, b):
                return jax.tree.map(jnp.add, carry, value_and_grad(params, b, frozen)), None

            first = jax.tree.map(lambda x: x[0], mb)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                 jax.eval_shape(value_and_grad, params, first, frozen))
            (grads, total, n, aux), _ = jax.lax.scan(body, zeros, mb)
        denom = jnp.maximum(n, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state.opt_state, params)
        metrics = {"loss": total / denom, "grad_norm": optax.global_norm(grads), "tokens": n,
                   **{k: v / denom for k, v in aux.items()}}
        return state.replace(step=state.step + 1, params=optax.apply_updates(params, updates),
                             opt_state=opt_state), metrics

    return step


def make_eval_step(config: ModelConfig, chunk: int = 256, num_groups: int = 1):
    """(params, batch) -> per-group summed NLL and token counts, [num_groups] each."""
    def step(params, batch):
        lp = token_logprobs(config, params, hidden_states(config, params, batch), batch["targets"], chunk)
        mask = batch["loss_mask"].astype(jnp.float32)
        onehot = jax.nn.one_hot(batch["group"], num_groups, dtype=jnp.float32) * mask[..., None]
        return -jnp.einsum("bt,btg->g", lp, onehot), onehot.sum(axis=(0, 1))
    return step
