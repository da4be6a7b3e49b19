"""Dense masked attention in plain jnp: the truth every S2 implementation is tested against.

    out[b, t, h] = sum_u softmax_u(q[b,t,h] . k[b,u,g(h)] / sqrt(D) + bias[h,t,u]) v[b,u,g(h)]

with g(h) = h // (Hq // Hkv) (GQA) and bias 0 where the token mask allows (t, u), -inf elsewhere:

    allowed[h, t, u] = layout[head(h), t // bs, u // bs]  and  (u <= t if causal)
                       and  segment[b, t] == segment[b, u]  (when segment_ids are given).

Scores, softmax and the weighted sum are float32; a row with nothing allowed gives 0. Costs O(T^2):
for tests only.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def layout_head_index(num_layout_heads: int, num_q_heads: int) -> np.ndarray:
    """For each query head, the index of its head in a layout with 1, Hkv or Hq heads."""
    if num_q_heads % num_layout_heads:
        raise ValueError(f"layout has {num_layout_heads} heads, which does not divide {num_q_heads} query heads")
    return np.arange(num_q_heads) // (num_q_heads // num_layout_heads)


def token_mask(pattern, seq_len: int, num_q_heads: int) -> jnp.ndarray:
    """Bool (Hq, T, T) token mask of a pattern (S2Pattern or BlockMask), without segments."""
    p = pattern.for_length(seq_len)
    lay = jnp.asarray(p.layout())[layout_head_index(p.layout_heads, num_q_heads)]
    t = np.arange(seq_len) // p.block_size
    mask = lay[:, t][:, :, t]
    if p.causal:
        mask &= jnp.tril(jnp.ones((seq_len, seq_len), bool))
    return mask


def attention(q, k, v, pattern, *, segment_ids=None, scale: float | None = None):
    """S2 attention by a dense masked softmax.

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D] with Hkv dividing Hq.
      pattern: an S2Pattern or BlockMask whose layout has 1, Hkv or Hq heads.
      segment_ids: optional int [B, T]; tokens attend only within their segment (0 is padding).
      scale: softmax scale, default 1/sqrt(D).
    Returns [B, T, Hq, D] in q's dtype.
    """
    b, t, hq, d = q.shape
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"{hkv} KV heads do not divide {hq} query heads")
    scale = d**-0.5 if scale is None else scale
    kv_idx = np.arange(hq) // (hq // hkv)
    k = k.astype(jnp.float32)[:, :, kv_idx]
    v = v.astype(jnp.float32)[:, :, kv_idx]
    s = jnp.einsum("bthd,buhd->bhtu", q.astype(jnp.float32), k) * scale
    mask = token_mask(pattern, t, hq)[None]
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    s = jnp.where(mask, s, -jnp.inf)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0)), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    return jnp.einsum("bhtu,buhd->bthd", p, v).astype(q.dtype)
