"""S2 attention as Pallas kernels: forward, dQ and dK/dV, wrapped in a custom VJP.

TPU (Mosaic): the CSR / CSC tables are scalar-prefetched and drive the BlockSpec index maps of a grid
(batch, logical head, query block, slot). Slot c of query block i maps to key block cols[n, i, c]; the
slots past a row's count repeat its last block, so the pipeline sees an unchanged block index, issues
no copy, and the body is skipped with pl.when: skipped blocks are never loaded. The dK/dV kernel walks
the transposed (CSC) table the same way, one key block per program, as DKernel's backward does.

GPU (Pallas on Triton): no scalar prefetch there, so `pallas_gpu.py` loops over the CSR row inside the
kernel instead. Both share the block math of `blocks.py`. On CPU all kernels run with interpret=True (tests).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import pallas_gpu
from .blocks import NEG, grad_block, mm, online_update, scores, seg_tiles, sum_kv_heads, with_vjp
from .plan import Plan, from_q_tiles, kv_tiles, make_plan, q_tiles

_SQ = pl.squeezed


# ---- TPU grid kernels --------------------------------------------------------------------------

def _fwd_kernel(cols, counts, q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc, *,
                pl_: Plan, scale: float):
    n, i, c = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    nq, width = pl_.num_blocks, cols.shape[0] // (pl_.num_logical * pl_.num_blocks)

    @pl.when(c == 0)
    def _():
        m_sc[...] = jnp.full(m_sc.shape, NEG, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(c < counts[n * nq + i])
    def _():
        kb = cols[(n * nq + i) * width + c]
        s = scores(q_ref[...], k_ref[...], scale, i, kb, pl_.block_size, pl_.causal, pl_.seq_len,
                   qs_ref[...], ks_ref[...])
        m_sc[...], l_sc[...], acc_sc[...] = online_update(s, v_ref[...], m_sc[...], l_sc[...], acc_sc[...])

    @pl.when(c == width - 1)
    def _():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)
        lse_ref[...] = m_sc[...] + jnp.log(l_sc[...])


def _dq_kernel(cols, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dq_ref, dq_sc, *,
               pl_: Plan, scale: float):
    n, i, c = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    nq, width = pl_.num_blocks, cols.shape[0] // (pl_.num_logical * pl_.num_blocks)

    @pl.when(c == 0)
    def _():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    @pl.when(c < counts[n * nq + i])
    def _():
        kb = cols[(n * nq + i) * width + c]
        k = k_ref[...]
        s = scores(q_ref[...], k, scale, i, kb, pl_.block_size, pl_.causal, pl_.seq_len, qs_ref[...], ks_ref[...])
        _, ds = grad_block(s, v_ref[...], do_ref[...], lse_ref[...], dl_ref[...], scale)
        dq_sc[...] += mm(ds.astype(k.dtype), k, 1, 0)

    @pl.when(c == width - 1)
    def _():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(rows, counts, q_ref, k_ref, v_ref, do_ref, lse_ref, dl_ref, qs_ref, ks_ref, dk_ref, dv_ref,
                dk_sc, dv_sc, *, pl_: Plan, scale: float):
    n, j, c = pl.program_id(1), pl.program_id(2), pl.program_id(3)
    nk, width = pl_.num_blocks, rows.shape[0] // (pl_.num_logical * pl_.num_blocks)

    @pl.when(c == 0)
    def _():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    @pl.when(c < counts[n * nk + j])
    def _():
        qi = rows[(n * nk + j) * width + c]
        q, do = q_ref[...], do_ref[...]
        s = scores(q, k_ref[...], scale, qi, j, pl_.block_size, pl_.causal, pl_.seq_len, qs_ref[...], ks_ref[...])
        p, ds = grad_block(s, v_ref[...], do, lse_ref[...], dl_ref[...], scale)
        dv_sc[...] += mm(p.astype(do.dtype), do, 0, 0)
        dk_sc[...] += mm(ds.astype(q.dtype), q, 0, 0)

    @pl.when(c == width - 1)
    def _():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def _tpu_specs(pl_: Plan, d: int, by_key: bool):
    """BlockSpecs of (q, k, v, do, lse, delta, q_seg, k_seg) for a grid over query blocks (CSR) or key
    blocks (CSC); the table entry of slot c picks the other side's block."""
    r, bs, nb = pl_.tile_rows, pl_.block_size, pl_.num_blocks
    ratio = pl_.kv_ratio

    def other(n, x, c, tab):  # block index read from the flattened table
        return tab[(n * nb + x) * (tab.shape[0] // (pl_.num_logical * nb)) + c]

    if by_key:
        qblk = lambda b, n, j, c, tab, cnt: other(n, j, c, tab)
        kblk = lambda b, n, j, c, tab, cnt: j
    else:
        qblk = lambda b, n, i, c, tab, cnt: i
        kblk = lambda b, n, i, c, tab, cnt: other(n, i, c, tab)
    kv_of = lambda n: n // ratio
    qspec = pl.BlockSpec((_SQ, _SQ, _SQ, r, d), lambda b, n, x, c, t, k: (b, n, qblk(b, n, x, c, t, k), 0, 0))
    kspec = pl.BlockSpec((_SQ, _SQ, _SQ, bs, d), lambda b, n, x, c, t, k: (b, kv_of(n), kblk(b, n, x, c, t, k), 0, 0))
    rowspec = pl.BlockSpec((_SQ, _SQ, _SQ, r, 1), lambda b, n, x, c, t, k: (b, n, qblk(b, n, x, c, t, k), 0, 0))
    qsspec = pl.BlockSpec((_SQ, _SQ, r, 1), lambda b, n, x, c, t, k: (b, qblk(b, n, x, c, t, k), 0, 0))
    ksspec = pl.BlockSpec((_SQ, _SQ, 1, bs), lambda b, n, x, c, t, k: (b, kblk(b, n, x, c, t, k), 0, 0))
    return qspec, kspec, rowspec, qsspec, ksspec


def _call(kernel, tables, grid, in_specs, out_specs, out_shape, scratch, interpret, *args):
    semantics = ("parallel", "parallel", "parallel", "arbitrary")
    return pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=2, grid=grid, in_specs=in_specs,
                                               out_specs=out_specs, scratch_shapes=scratch),
        out_shape=out_shape,
        compiler_params=None if interpret else pltpu.CompilerParams(dimension_semantics=semantics),
        interpret=interpret,
    )(*tables, *args)


def _tpu_forward(pl_: Plan, scale, interpret, q, k, v, segment_ids):
    b, d = q.shape[0], q.shape[-1]
    qt, kt, vt = q_tiles(pl_, q), kv_tiles(pl_, k), kv_tiles(pl_, v)
    qs, ks = seg_tiles(pl_, segment_ids, b)
    qspec, kspec, rowspec, qsspec, ksspec = _tpu_specs(pl_, d, by_key=False)
    tables = (jnp.asarray(pl_.cols.reshape(-1)), jnp.asarray(pl_.counts.reshape(-1)))
    grid = (b, pl_.num_logical, pl_.num_blocks, pl_.cols.shape[-1])
    r = pl_.tile_rows
    o, lse = _call(
        functools.partial(_fwd_kernel, pl_=pl_, scale=scale), tables, grid,
        [qspec, kspec, kspec, qsspec, ksspec], [qspec, rowspec],
        [jax.ShapeDtypeStruct(qt.shape, q.dtype), jax.ShapeDtypeStruct(qt.shape[:-1] + (1,), jnp.float32)],
        [pltpu.VMEM((r, 1), jnp.float32), pltpu.VMEM((r, 1), jnp.float32), pltpu.VMEM((r, d), jnp.float32)],
        interpret, qt, kt, vt, qs, ks)
    return o, lse


def _tpu_backward(pl_: Plan, scale, interpret, q, k, v, segment_ids, o_t, lse, do):
    b, d = q.shape[0], q.shape[-1]
    qt, kt, vt, dot = q_tiles(pl_, q), kv_tiles(pl_, k), kv_tiles(pl_, v), q_tiles(pl_, do)
    delta = jnp.sum(o_t.astype(jnp.float32) * dot.astype(jnp.float32), axis=-1, keepdims=True)
    qs, ks = seg_tiles(pl_, segment_ids, b)
    args = (qt, kt, vt, dot, lse, delta, qs, ks)
    r, bs = pl_.tile_rows, pl_.block_size

    qspec, kspec, rowspec, qsspec, ksspec = _tpu_specs(pl_, d, by_key=False)
    tables = (jnp.asarray(pl_.cols.reshape(-1)), jnp.asarray(pl_.counts.reshape(-1)))
    dq = _call(
        functools.partial(_dq_kernel, pl_=pl_, scale=scale), tables,
        (b, pl_.num_logical, pl_.num_blocks, pl_.cols.shape[-1]),
        [qspec, kspec, kspec, qspec, rowspec, rowspec, qsspec, ksspec], qspec,
        jax.ShapeDtypeStruct(qt.shape, q.dtype), [pltpu.VMEM((r, d), jnp.float32)], interpret, *args)

    qspec, kspec, rowspec, qsspec, ksspec = _tpu_specs(pl_, d, by_key=True)
    dkv_spec = pl.BlockSpec((_SQ, _SQ, _SQ, bs, d), lambda b_, n, j, c, t, k_: (b_, n, j, 0, 0))
    tables = (jnp.asarray(pl_.rows.reshape(-1)), jnp.asarray(pl_.row_counts.reshape(-1)))
    shape = jax.ShapeDtypeStruct((b, pl_.num_logical, pl_.num_blocks, bs, d), jnp.float32)
    dk, dv = _call(
        functools.partial(_dkv_kernel, pl_=pl_, scale=scale), tables,
        (b, pl_.num_logical, pl_.num_blocks, pl_.rows.shape[-1]),
        [qspec, kspec, kspec, qspec, rowspec, rowspec, qsspec, ksspec], [dkv_spec, dkv_spec],
        [shape, shape], [pltpu.VMEM((bs, d), jnp.float32), pltpu.VMEM((bs, d), jnp.float32)], interpret, *args)
    return from_q_tiles(pl_, dq), sum_kv_heads(pl_, dk, k), sum_kv_heads(pl_, dv, v)


class _TPU:
    forward = staticmethod(_tpu_forward)
    backward = staticmethod(_tpu_backward)


def attention(q, k, v, pattern, *, segment_ids=None, scale: float | None = None, interpret: bool | None = None,
              backend: str | None = None):
    """S2 attention with Pallas kernels (custom VJP: forward, dQ and dK/dV kernels).

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; float32 or bfloat16 (float32 softmax and accumulators).
      pattern: S2Pattern or BlockMask; T is padded to the block size internally.
      segment_ids: optional int [B, T]; attention stays inside a segment.
      scale: softmax scale, default 1/sqrt(D).
      interpret: run the kernels in the Pallas interpreter; default: when the backend is the CPU.
      backend: "tpu" (scalar-prefetch grid) or "gpu" (Pallas-Triton, loop over the CSR row);
        default: the default backend ("tpu" form on CPU).
    """
    backend = backend or jax.default_backend()
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if backend == "gpu":
        pl_ = make_plan(pattern, q.shape[1], q.shape[2], k.shape[2], merge_groups=False)
        return with_vjp(pallas_gpu.GPU, pl_, scale, interpret, q, k, v, segment_ids)
    pl_ = make_plan(pattern, q.shape[1], q.shape[2], k.shape[2])
    return with_vjp(_TPU, pl_, scale, interpret, q, k, v, segment_ids)
