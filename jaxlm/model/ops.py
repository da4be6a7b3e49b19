"""Array operations shared by every attention core (dense, S2, retrieval) and the layers.

Shape suffixes name the axes: B batch, T (Tq, Tk) positions, H (Hq, Hkv) heads, D head width,
G query heads per KV head.

Masking is two integer arrays for queries and keys:
  * slot indices (`q_idx` [Tq] or [B, Tq], `k_idx` [Tk]): a query attends keys whose slot is <= its own
    (causal); per-row query slots come from a cache whose rows are at different lengths;
  * segment ids (`q_seg` [B, Tq], `k_seg` [B, Tk]): a query attends only keys of its own segment.
Packed documents, left padding (segment 0) and a preallocated KV cache (empty slots are segment 0 and
lie in the future) are all the same two rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.kernels.common import NEG_INF

__all__ = ["NEG_INF", "attend", "attention_mask", "dtype_of", "write_rows"]

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    return DTYPES[name]


def attention_mask(q_idx, k_idx, q_seg=None, k_seg=None, causal: bool = True, window: int = 0):
    """Boolean [B or 1, Tq, Tk] mask from slots and segments (and an optional sliding window)."""
    q_idx_BxTqx1 = jnp.reshape(q_idx, (-1, q_idx.shape[-1], 1))  # [Tq] -> [1, Tq, 1]; [B, Tq] -> [B, Tq, 1]
    if causal:
        mask_BxTqxTk = k_idx[None, None, :] <= q_idx_BxTqx1
    else:
        mask_BxTqxTk = jnp.ones((1, q_idx.shape[-1], k_idx.shape[0]), bool)
    if window:
        mask_BxTqxTk = mask_BxTqxTk & (q_idx_BxTqx1 - k_idx[None, None, :] < window)
    if q_seg is None:
        return mask_BxTqxTk
    return mask_BxTqxTk & (q_seg[:, :, None] == k_seg[:, None, :])


def attend(q_BxTqxHqxD, k_BxTkxHkvxD, v_BxTkxHkvxD, mask):
    """Softmax attention with GQA: query head h reads KV head h // (Hq // Hkv).

    mask: bool [B|1, Tq, Tk] (all heads) or [B|1, Hkv, Tq, Tk] (per KV head, as S2 needs).
    Scores and softmax are float32 (scale 1/sqrt(D)); the output has q's dtype.
    """
    b, tq, hq, d = q_BxTqxHqxD.shape
    hkv = k_BxTkxHkvxD.shape[2]
    q_BxTqxHkvxGxD = q_BxTqxHqxD.reshape(b, tq, hkv, hq // hkv, d)
    s_BxHkvxGxTqxTk = jnp.einsum("bqhgd,bkhd->bhgqk", q_BxTqxHkvxGxD, k_BxTkxHkvxD,
                                 preferred_element_type=jnp.float32) * (d ** -0.5)
    mask_BxHxGxTqxTk = mask[:, None, None] if mask.ndim == 3 else mask[:, :, None]
    s_BxHkvxGxTqxTk = jnp.where(mask_BxHxGxTqxTk, s_BxHkvxGxTqxTk, NEG_INF)
    p = jax.nn.softmax(s_BxHkvxGxTqxTk, axis=-1).astype(v_BxTkxHkvxD.dtype)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, v_BxTkxHkvxD, preferred_element_type=jnp.float32)
    return o.reshape(b, tq, hq, d).astype(q_BxTqxHqxD.dtype)


def write_rows(buf_BxSx, x_BxTx, index):
    """Write x [B, T, ...] into buf [B, S, ...] at slot `index` along axis 1: one scalar slot for every
    row, or per-row slots [B] (rows of a continuously batched cache are at different lengths)."""
    x = x_BxTx.astype(buf_BxSx.dtype)
    if jnp.ndim(index) == 0:
        return jax.lax.dynamic_update_slice_in_dim(buf_BxSx, x, index, axis=1)
    return jax.vmap(lambda b, r, i: jax.lax.dynamic_update_slice_in_dim(b, r, i, axis=0))(buf_BxSx, x, index)
