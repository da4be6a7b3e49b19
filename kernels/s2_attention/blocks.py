"""Block math shared by the Pallas TPU (`pallas.py`) and GPU (`pallas_gpu.py`) kernels, and their custom VJP.

Per block (s: scores of the tile rows against one key block, float32):
    m' = max(m, rowmax s);  p = exp(s - m');  l' = l e^(m - m') + rowsum p;  acc' = acc e^(m - m') + p v
    backward, with lse = m + log l and delta = rowsum(o * do):
    p = exp(s - lse);  dv += p^T do;  ds = p (do v^T - delta) scale;  dq += ds k;  dk += ds^T q
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..common import NEG_INF as NEG
from .plan import Plan, from_kv_tiles, from_q_tiles, pad_len

__all__ = ["NEG", "with_vjp", "grad_block", "mm", "online_update", "scores", "seg_tiles", "sum_kv_heads"]


def scores(q, k, scale, qi, kb, bs: int, causal: bool, seq_len: int, qseg, kseg):
    """Masked float32 scores (R, bs) of the tile rows of query block qi against key block kb."""
    s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    rows = jax.lax.broadcasted_iota(jnp.int32, s.shape, 0)
    qpos = qi * bs + jnp.bitwise_and(rows, bs - 1)  # row r is token r % bs of its head
    kpos = kb * bs + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
    ok = kpos <= qpos if causal else kpos < seq_len
    ok = ok & (qseg == kseg)  # (R, 1) == (1, bs)
    return jnp.where(ok, s, NEG)


def online_update(s, v, m, den, acc):
    """One step of the online softmax; m, den (= l): (R, 1), acc: (R, D) float32."""
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(s - m_new)
    den_new = alpha * den + p.sum(axis=1, keepdims=True)
    pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
    return m_new, den_new, alpha * acc + pv


def grad_block(s, v, do, lse, delta, scale):
    """(p, ds) of one block for the backward; ds already carries the softmax scale."""
    p = jnp.exp(s - lse)
    dp = jax.lax.dot_general(do, v, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return p, p * (dp - delta) * scale


def mm(a, b, contract_a: int, contract_b: int):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def seg_tiles(pl_: Plan, segment_ids, batch: int):
    """(q_seg [B, nq, R, 1], k_seg [B, nk, 1, bs]); all zeros (one segment) when segment_ids is None."""
    bs, nb = pl_.block_size, pl_.num_blocks
    if segment_ids is None:
        seg = jnp.zeros((batch, pl_.padded_len), jnp.int32)
    else:
        seg = pad_len(segment_ids.astype(jnp.int32), pl_.padded_len, value=-1)
    blocks = seg.reshape(batch, nb, 1, bs)
    q_seg = jnp.broadcast_to(blocks, (batch, nb, pl_.gq, bs)).reshape(batch, nb, -1, 1)
    return q_seg, blocks


def sum_kv_heads(pl_: Plan, dk, k):
    """[B, Hn, nk, bs, D] per logical head -> [B, T, Hkv, D]: heads sharing a KV head add up."""
    b, hn = dk.shape[:2]
    hkv = k.shape[2]
    dk = dk.reshape(b, hkv, hn // hkv, *dk.shape[2:]).sum(2)  # kv(n) = n // (Hn // Hkv)
    return from_kv_tiles(pl_, dk).astype(k.dtype)


# ---- custom VJP and entry point ----------------------------------------------------------------

@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def with_vjp(impl, pl_, scale, interpret, q, k, v, segment_ids):
    """Attention through `impl.forward` / `impl.backward` (a TPU or GPU kernel set) as one differentiable op."""
    return from_q_tiles(pl_, impl.forward(pl_, scale, interpret, q, k, v, segment_ids)[0])


def _vjp_fwd(impl, pl_, scale, interpret, q, k, v, segment_ids):
    o_t, lse = impl.forward(pl_, scale, interpret, q, k, v, segment_ids)
    return from_q_tiles(pl_, o_t), (q, k, v, segment_ids, o_t, lse)


def _vjp_bwd(impl, pl_, scale, interpret, res, do):
    q, k, v, segment_ids, o_t, lse = res
    dq, dk, dv = impl.backward(pl_, scale, interpret, q, k, v, segment_ids, o_t, lse, do)
    dseg = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq, dk, dv, dseg


with_vjp.defvjp(_vjp_fwd, _vjp_bwd)
