"""The one Attention module: projections, RoPE, GQA, and a core chosen by `config.attention.impl`.

Masking is expressed with two integer arrays for queries and keys:
  * slot indices (`q_idx` [Tq], `k_idx` [Tk]): a query attends keys whose slot is <= its own (causal);
  * segment ids (`q_seg` [B, Tq], `k_seg` [B, Tk]): a query attends only keys of its own segment.
Packed documents, left padding (segment 0) and a preallocated KV cache (empty slots are segment 0 and
lie in the future) are all the same two rules.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxlm.model.config import ModelConfig
from jaxlm.model.rope import apply_rope

NEG_INF = -0.7 * float(jnp.finfo(jnp.float32).max)


def dtype_of(name: str):
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}[name]


def attention_mask(q_idx, k_idx, q_seg=None, k_seg=None, causal: bool = True, window: int = 0):
    """Boolean [B or 1, Tq, Tk] mask from slots and segments (and an optional sliding window)."""
    mask = (k_idx[None, :] <= q_idx[:, None])[None] if causal else jnp.ones((1, q_idx.shape[0], k_idx.shape[0]), bool)
    if window:
        mask = mask & (q_idx[:, None] - k_idx[None, :] < window)[None]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask


def dense_attention(q, k, v, mask):
    """Softmax attention with GQA. q [B, Tq, Hq, D]; k, v [B, Tk, Hkv, D]; mask [B|1, Tq, Tk].

    Scores and softmax are float32; query head h reads kv head h // (Hq // Hkv).
    """
    b, tq, hq, d = q.shape
    hkv = k.shape[2]
    q = q.reshape(b, tq, hkv, hq // hkv, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", q, k, preferred_element_type=jnp.float32) * (d ** -0.5)
    s = jnp.where(mask[:, None, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v.dtype)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, hq, d).astype(q.dtype)


def kernel_param(module: nn.Module, name: str, shape, axes, config: ModelConfig):
    init = nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)
    return module.param(name, init, shape, dtype_of(config.param_dtype))


class Attention(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x, ctx, layer_xs, carried=None):
        """x [B, T, d] -> ([B, T, d], new layer cache or None, carried).

        ctx (shared by all layers) holds cos, sin [B, T, R/2], q_idx [T], q_seg [B, T] or None, and in
        cache mode `index` (the first slot written) and k_seg [B, S] (segment ids of the updated cache);
        with retrieval, `retrieval` (see jaxlm.model.retrieval). layer_xs (this layer's slice of the
        scan) holds `layer` (the layer index) and, in cache mode, this layer's cache `k`, `v`.
        carried: caches that travel in the scan's carry (the S2-compressed cache, jaxlm.model.s2).
        """
        c = self.config
        dt = dtype_of(c.dtype)
        hd = c.head_size
        d = c.hidden_size
        wq = kernel_param(self, "q", (d, c.num_heads, hd), ("embed", "heads", "head_dim"), c)
        wk = kernel_param(self, "k", (d, c.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), c)
        wv = kernel_param(self, "v", (d, c.num_kv_heads, hd), ("embed", "kv_heads", "head_dim"), c)
        wo = kernel_param(self, "o", (c.num_heads, hd, d), ("heads", "head_dim", "embed"), c)

        x = x.astype(dt)
        q_raw = jnp.einsum("btd,dhk->bthk", x, wq.astype(dt))
        q = q_raw
        k = jnp.einsum("btd,dhk->bthk", x, wk.astype(dt))
        v = jnp.einsum("btd,dhk->bthk", x, wv.astype(dt))
        q = nn.with_logical_constraint(q, ("batch", "length", "heads", "head_dim"))
        k = nn.with_logical_constraint(k, ("batch", "length", "kv_heads", "head_dim"))
        v = nn.with_logical_constraint(v, ("batch", "length", "kv_heads", "head_dim"))
        q = apply_rope(q, ctx["cos"], ctx["sin"])
        k = apply_rope(k, ctx["cos"], ctx["sin"])

        new_cache = None
        carried = carried if carried is not None else {}
        compressed = "ks" in carried
        if compressed:  # S2-compressed cache: the mask over the (dense layers') full-length slots
            mask = attention_mask(ctx["q_idx"], jnp.arange(ctx["k_seg"].shape[1]), ctx["q_seg"], ctx["k_seg"])
        elif "k" in layer_xs:
            idx = ctx["index"]
            kc = jax.lax.dynamic_update_slice(layer_xs["k"], k.astype(layer_xs["k"].dtype), (0, idx, 0, 0))
            vc = jax.lax.dynamic_update_slice(layer_xs["v"], v.astype(layer_xs["v"].dtype), (0, idx, 0, 0))
            new_cache = {"k": kc, "v": vc}
            k, v = kc.astype(dt), vc.astype(dt)
            k_idx = jnp.arange(kc.shape[1])
            mask = attention_mask(ctx["q_idx"], k_idx, ctx["q_seg"], ctx["k_seg"], window=c.sliding_window)
        else:
            mask = attention_mask(ctx["q_idx"], ctx["q_idx"], ctx["q_seg"], ctx["q_seg"], window=c.sliding_window)

        impl = c.attention.impl
        if impl == "retrieval" and "retrieval" in ctx:
            from jaxlm.model.retrieval import retrieval_attention

            o = retrieval_attention(c, q_raw, q, k, v, mask, layer_xs["layer"], ctx["retrieval"], wk.astype(dt),
                                    wv.astype(dt))
        elif impl == "s2":
            from jaxlm.model import s2

            if compressed:
                o, carried = s2.compressed_core(c, q, k, v, mask, ctx, layer_xs["layer"], carried,
                                                ctx["k_seg"].shape[1])
            elif "k" in layer_xs:
                o = s2.full_cache_core(c, q, k, v, mask, ctx, layer_xs["layer"])
            else:
                o = s2.train_core(c, q, k, v, mask, ctx["q_seg"], layer_xs["layer"])
        else:  # dense, and retrieval models without a datastore (training, short inputs)
            o = dense_attention(q, k, v, mask)
        o = nn.with_logical_constraint(o, ("batch", "length", "heads", "head_dim"))
        o = checkpoint_name(o, "attn_out")
        y = jnp.einsum("bthk,hkd->btd", o, wo.astype(dt))
        return nn.with_logical_constraint(y, ("batch", "length", "embed")), new_cache, carried
