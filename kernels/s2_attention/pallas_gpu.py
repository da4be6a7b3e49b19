"""S2 attention kernels for Pallas on GPU (Triton lowering): loop over the CSR row inside the kernel.

GPU Pallas has no scalar prefetch, so one program owns one query tile (forward, dQ) or one key block
(dK/dV) and walks its table row with a fori_loop whose trip count is the row's count. K/V (or Q/dO)
stay in global memory as whole-sequence refs; only the listed blocks are loaded with `ref[pl.ds(...)]`,
so skipped blocks are never read. Tile rows must be a power of two on Triton, hence one query head per
program (plan with merge_groups=False) and head_dim a power of two. The block math is shared with the
TPU kernels (blocks.py).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from .blocks import NEG, grad_block, mm, online_update, scores, seg_tiles, sum_kv_heads
from .plan import Plan, from_q_tiles, kv_tiles, q_tiles

_SQ = pl.squeezed


def _fwd_kernel(cols_ref, counts_ref, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, pl_: Plan, scale):
    n, i = pl.program_id(1), pl.program_id(2)
    bs, q, qs = pl_.block_size, q_ref[...], qs_ref[...]

    def body(c, carry):
        kb = cols_ref[n, i, c]
        blk = pl.ds(kb * bs, bs)
        s = scores(q, k_ref[blk, :], scale, i, kb, bs, pl_.causal, pl_.seq_len, qs, ks_ref[:, blk])
        return online_update(s, v_ref[blk, :], *carry)

    r, d = q.shape
    init = (jnp.full((r, 1), NEG, jnp.float32), jnp.zeros((r, 1), jnp.float32), jnp.zeros((r, d), jnp.float32))
    m, den, acc = jax.lax.fori_loop(0, counts_ref[n, i], body, init)
    o_ref[...] = (acc / den).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(den)


def _dq_kernel(cols_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, *,
               pl_: Plan, scale):
    n, i = pl.program_id(1), pl.program_id(2)
    bs, q, do, qs = pl_.block_size, q_ref[...], do_ref[...], qs_ref[...]
    lse, delta = lse_ref[...], dl_ref[...]

    def body(c, dq):
        kb = cols_ref[n, i, c]
        blk = pl.ds(kb * bs, bs)
        k = k_ref[blk, :]
        s = scores(q, k, scale, i, kb, bs, pl_.causal, pl_.seq_len, qs, ks_ref[:, blk])
        _, ds = grad_block(s, v_ref[blk, :], do, lse, delta, scale)
        return dq + mm(ds.astype(k.dtype), k, 1, 0)

    dq = jax.lax.fori_loop(0, counts_ref[n, i], body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _dkv_kernel(rows_ref, counts_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dk_ref, dv_ref,
                *, pl_: Plan, scale):
    n, j = pl.program_id(1), pl.program_id(2)
    bs, k, v, ks = pl_.block_size, k_ref[...], v_ref[...], ks_ref[...]

    def body(c, carry):
        qi = rows_ref[n, j, c]
        blk = pl.ds(qi * bs, bs)
        q, do = q_ref[blk, :], do_ref[blk, :]
        s = scores(q, k, scale, qi, j, bs, pl_.causal, pl_.seq_len, qs_ref[blk, :], ks)
        p, ds = grad_block(s, v, do, lse_ref[blk, :], dl_ref[blk, :], scale)
        return carry[0] + mm(ds.astype(q.dtype), q, 0, 0), carry[1] + mm(p.astype(do.dtype), do, 0, 0)

    zero = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(0, counts_ref[n, j], body, (zero, zero))
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _flat(x):
    """[B, Hn, nq, R, X] -> [B, Hn, nq * R, X]: whole-sequence refs sliced per block in the kernel."""
    return x.reshape(x.shape[0], x.shape[1], -1, x.shape[-1])


def _inputs(pl_: Plan, q, k, v, segment_ids):
    b = q.shape[0]
    qs, ks = seg_tiles(pl_, segment_ids, b)
    kt, vt = (x.reshape(b, x.shape[1], -1, x.shape[-1]) for x in (kv_tiles(pl_, k), kv_tiles(pl_, v)))
    return q_tiles(pl_, q), kt, vt, qs, ks.reshape(b, 1, -1)


def _specs(pl_: Plan, d: int):
    """Specs over a grid (b, n, block): one tile of the own side, whole sequences of the other."""
    bs, tp, ratio = pl_.block_size, pl_.padded_len, pl_.kv_ratio
    return dict(
        tile=pl.BlockSpec((_SQ, _SQ, _SQ, bs, d), lambda b, n, x: (b, n, x, 0, 0)),
        row=pl.BlockSpec((_SQ, _SQ, _SQ, bs, 1), lambda b, n, x: (b, n, x, 0, 0)),
        qseg=pl.BlockSpec((_SQ, _SQ, bs, 1), lambda b, n, x: (b, x, 0, 0)),
        kv_all=pl.BlockSpec((_SQ, _SQ, tp, d), lambda b, n, x: (b, n // ratio, 0, 0)),
        kv_blk=pl.BlockSpec((_SQ, _SQ, bs, d), lambda b, n, x: (b, n // ratio, x, 0)),
        q_all=pl.BlockSpec((_SQ, _SQ, tp, d), lambda b, n, x: (b, n, 0, 0)),
        row_all=pl.BlockSpec((_SQ, _SQ, tp, 1), lambda b, n, x: (b, n, 0, 0)),
        qseg_all=pl.BlockSpec((_SQ, tp, 1), lambda b, n, x: (b, 0, 0)),
        kseg_all=pl.BlockSpec((_SQ, 1, tp), lambda b, n, x: (b, 0, 0)),
        kseg_blk=pl.BlockSpec((_SQ, 1, bs), lambda b, n, x: (b, 0, x)),
    )


def _call(kernel, grid, in_specs, out_specs, out_shape, interpret, *args):
    full = [pl.BlockSpec(a.shape, lambda *_, nd=a.ndim: (0,) * nd) for a in args[:2]]
    return pl.pallas_call(kernel, grid=grid, in_specs=full + in_specs, out_specs=out_specs, out_shape=out_shape,
                          interpret=interpret)(*args)


def forward(pl_: Plan, scale, interpret, q, k, v, segment_ids):
    qt, kt, vt, qs, ks = _inputs(pl_, q, k, v, segment_ids)
    sp = _specs(pl_, q.shape[-1])
    grid = (q.shape[0], pl_.num_logical, pl_.num_blocks)
    return _call(
        functools.partial(_fwd_kernel, pl_=pl_, scale=scale), grid,
        [sp["tile"], sp["kv_all"], sp["kv_all"], sp["qseg"], sp["kseg_all"]], [sp["tile"], sp["row"]],
        [jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct(qt.shape[:-1] + (1,), jnp.float32)],
        interpret, jnp.asarray(pl_.cols), jnp.asarray(pl_.counts), qt, kt, vt, qs, ks)


def backward(pl_: Plan, scale, interpret, q, k, v, segment_ids, o_t, lse, do):
    qt, kt, vt, qs, ks = _inputs(pl_, q, k, v, segment_ids)
    dot = q_tiles(pl_, do)
    delta = jnp.sum(o_t.astype(jnp.float32) * dot.astype(jnp.float32), axis=-1, keepdims=True)
    sp = _specs(pl_, q.shape[-1])
    b, d, bs = q.shape[0], q.shape[-1], pl_.block_size
    grid = (b, pl_.num_logical, pl_.num_blocks)
    dq = _call(
        functools.partial(_dq_kernel, pl_=pl_, scale=scale), grid,
        [sp["tile"], sp["kv_all"], sp["kv_all"], sp["tile"], sp["row"], sp["row"], sp["qseg"], sp["kseg_all"]],
        sp["tile"], jax.ShapeDtypeStruct(qt.shape, q.dtype),
        interpret, jnp.asarray(pl_.cols), jnp.asarray(pl_.counts), qt, kt, vt, dot, lse, delta, qs, ks)
    shape = jax.ShapeDtypeStruct((b, pl_.num_logical, pl_.num_blocks * bs, d), jnp.float32)
    dkv_spec = pl.BlockSpec((_SQ, _SQ, bs, d), lambda b_, n, x: (b_, n, x, 0))
    dk, dv = _call(
        functools.partial(_dkv_kernel, pl_=pl_, scale=scale), grid,
        [sp["q_all"], sp["kv_blk"], sp["kv_blk"], sp["q_all"], sp["row_all"], sp["row_all"], sp["qseg_all"],
         sp["kseg_blk"]],
        [dkv_spec, dkv_spec], [shape, shape], interpret,
        jnp.asarray(pl_.rows), jnp.asarray(pl_.row_counts), _flat(qt), kt, vt, _flat(dot), _flat(lse), _flat(delta),
        qs.reshape(b, -1, 1), ks)
    unflat = lambda x: x.reshape(b, pl_.num_logical, pl_.num_blocks, bs, d)
    return from_q_tiles(pl_, dq), sum_kv_heads(pl_, unflat(dk), k), sum_kv_heads(pl_, unflat(dv), v)


class GPU:
    forward = staticmethod(forward)
    backward = staticmethod(backward)
