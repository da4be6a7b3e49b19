"""S2 attention as Triton kernels (DKernel's design), called from JAX through jax_triton on GPU.

Forward and dQ: one program per (query block i, batch x query head); it walks the CSR row of its layout
head, cols[lh, i, :counts[lh, i]], so skipped key blocks are never loaded. dK/dV: one program per
(key block j, batch x query head) walking the CSC column rows[lh, j, :]; GQA heads of a group add
their dK/dV afterwards. The online softmax and its backward are those of flash attention:

    m' = max(m, rowmax s);  l' = l e^(m - m') + rowsum e^(s - m');  acc' = acc e^(m - m') + e^(s - m') v
    p = e^(s - lse);  dv += p^T do;  ds = p (do v^T - delta) scale;  dq += ds k;  dk += ds^T q

Tensors are contiguous [B, H, Tp, D] (Tp = T padded to the block size); the layout head of query head
h is h // (Hq // HL) and its KV head h // (Hq // Hkv). Block size and head_dim must be powers of two
>= 16 (tl.arange / tl.dot).

`triton` is imported here but jax_triton only on use (it raises ImportError on a CPU-only jax). On CPU
the kernels run under TRITON_INTERPRET=1 with torch tensors (`torch_attention`), which is how the
tests check them against the reference.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..common import NEG_INF as NEG
from .pattern import csc_tables, csr_tables

try:
    import triton
    import triton.language as tl
except ImportError:  # the jax entry point raises a clear error when called
    triton = None


if triton is not None:
    NEG = tl.constexpr(NEG)  # compiled kernels may read module globals only as constexpr (the interpreter allows any)

    @triton.jit
    def _scores(q, k, qpos, kpos, qseg, kseg, scale, T: tl.constexpr, CAUSAL: tl.constexpr):
        s = tl.dot(q, tl.trans(k)) * scale
        if CAUSAL:
            ok = kpos[None, :] <= qpos[:, None]
        else:
            ok = (kpos[None, :] < T) & (qpos[:, None] >= 0)
        ok = ok & (qseg[:, None] == kseg[None, :])
        return tl.where(ok, s, NEG)

    @triton.jit
    def _fwd(Q, K, V, SEG, COLS, CNT, OUT, LSE, scale: tl.constexpr, T: tl.constexpr, TP: tl.constexpr, HQ: tl.constexpr,
             HKV: tl.constexpr, HL: tl.constexpr, NB: tl.constexpr, W: tl.constexpr, BS: tl.constexpr,
             D: tl.constexpr, CAUSAL: tl.constexpr):
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        lh = h // (HQ // HL)
        kvb = (b * HKV + h // (HQ // HKV)) * TP
        r = tl.arange(0, BS)
        d = tl.arange(0, D)
        qpos = i * BS + r
        q = tl.load(Q + (bh * TP + qpos)[:, None] * D + d[None, :])
        qseg = tl.load(SEG + b * TP + qpos)
        m = tl.full([BS], NEG, tl.float32)
        den = tl.zeros([BS], tl.float32)
        acc = tl.zeros([BS, D], tl.float32)
        row = lh * NB + i
        for c in range(0, tl.load(CNT + row)):
            kpos = tl.load(COLS + row * W + c) * BS + r
            k = tl.load(K + (kvb + kpos)[:, None] * D + d[None, :])
            v = tl.load(V + (kvb + kpos)[:, None] * D + d[None, :])
            s = _scores(q, k, qpos, kpos, qseg, tl.load(SEG + b * TP + kpos), scale, T, CAUSAL)
            m_new = tl.maximum(m, tl.max(s, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            den = den * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m = m_new
        tl.store(OUT + (bh * TP + qpos)[:, None] * D + d[None, :], (acc / den[:, None]).to(OUT.dtype.element_ty))
        tl.store(LSE + bh * TP + qpos, m + tl.log(den))

    @triton.jit
    def _dq(Q, K, V, DO, LSE, DELTA, SEG, COLS, CNT, DQ, scale: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
            HQ: tl.constexpr, HKV: tl.constexpr, HL: tl.constexpr, NB: tl.constexpr, W: tl.constexpr,
            BS: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
        i = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        lh = h // (HQ // HL)
        kvb = (b * HKV + h // (HQ // HKV)) * TP
        r = tl.arange(0, BS)
        d = tl.arange(0, D)
        qpos = i * BS + r
        q = tl.load(Q + (bh * TP + qpos)[:, None] * D + d[None, :])
        do = tl.load(DO + (bh * TP + qpos)[:, None] * D + d[None, :])
        lse = tl.load(LSE + bh * TP + qpos)
        delta = tl.load(DELTA + bh * TP + qpos)
        qseg = tl.load(SEG + b * TP + qpos)
        dq = tl.zeros([BS, D], tl.float32)
        row = lh * NB + i
        for c in range(0, tl.load(CNT + row)):
            kpos = tl.load(COLS + row * W + c) * BS + r
            k = tl.load(K + (kvb + kpos)[:, None] * D + d[None, :])
            v = tl.load(V + (kvb + kpos)[:, None] * D + d[None, :])
            s = _scores(q, k, qpos, kpos, qseg, tl.load(SEG + b * TP + kpos), scale, T, CAUSAL)
            p = tl.exp(s - lse[:, None])
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * scale
            dq += tl.dot(ds.to(k.dtype), k)
        tl.store(DQ + (bh * TP + qpos)[:, None] * D + d[None, :], dq.to(DQ.dtype.element_ty))

    @triton.jit
    def _dkv(Q, K, V, DO, LSE, DELTA, SEG, ROWS, CNT, DK, DV, scale: tl.constexpr, T: tl.constexpr, TP: tl.constexpr,
             HQ: tl.constexpr, HKV: tl.constexpr, HL: tl.constexpr, NB: tl.constexpr, W: tl.constexpr,
             BS: tl.constexpr, D: tl.constexpr, CAUSAL: tl.constexpr):
        j = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // HQ
        h = bh % HQ
        lh = h // (HQ // HL)
        kvb = (b * HKV + h // (HQ // HKV)) * TP
        r = tl.arange(0, BS)
        d = tl.arange(0, D)
        kpos = j * BS + r
        k = tl.load(K + (kvb + kpos)[:, None] * D + d[None, :])
        v = tl.load(V + (kvb + kpos)[:, None] * D + d[None, :])
        kseg = tl.load(SEG + b * TP + kpos)
        dk = tl.zeros([BS, D], tl.float32)
        dv = tl.zeros([BS, D], tl.float32)
        col = lh * NB + j
        for c in range(0, tl.load(CNT + col)):
            qpos = tl.load(ROWS + col * W + c) * BS + r
            q = tl.load(Q + (bh * TP + qpos)[:, None] * D + d[None, :])
            do = tl.load(DO + (bh * TP + qpos)[:, None] * D + d[None, :])
            lse = tl.load(LSE + bh * TP + qpos)
            delta = tl.load(DELTA + bh * TP + qpos)
            s = _scores(q, k, qpos, kpos, tl.load(SEG + b * TP + qpos), kseg, scale, T, CAUSAL)
            p = tl.exp(s - lse[:, None])
            dv += tl.dot(tl.trans(p).to(do.dtype), do)
            ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None]) * scale
            dk += tl.dot(tl.trans(ds).to(q.dtype), q)
        tl.store(DK + (bh * TP + kpos)[:, None] * D + d[None, :], dk.to(DK.dtype.element_ty))
        tl.store(DV + (bh * TP + kpos)[:, None] * D + d[None, :], dv.to(DV.dtype.element_ty))


def tables(pattern, seq_len: int, num_q_heads: int, num_kv_heads: int) -> dict:
    """Host-side tables and constants of one call: CSR / CSC tables of the layout heads + constexprs."""
    p = pattern.for_length(seq_len)
    hl, bs = p.layout_heads, p.block_size
    if num_q_heads % num_kv_heads or num_q_heads % hl or hl not in (1, num_kv_heads, num_q_heads):
        raise ValueError(f"heads: q={num_q_heads}, kv={num_kv_heads}, layout={hl}")
    cnt, cols = csr_tables(p)
    rcnt, rows = csc_tables(p)
    nb = cols.shape[1]
    consts = dict(T=seq_len, TP=nb * bs, HQ=num_q_heads, HKV=num_kv_heads, HL=hl, NB=nb, BS=bs, CAUSAL=p.causal)
    return dict(cols=np.ascontiguousarray(cols), cnt=cnt, rows=np.ascontiguousarray(rows), rcnt=rcnt,
                consts=consts)


# ---- JAX (GPU, jax_triton) ---------------------------------------------------------------------

def _jax_prep(x, tp):
    x = jnp.pad(x, ((0, 0), (0, tp - x.shape[1]), (0, 0), (0, 0)))
    return jnp.transpose(x, (0, 2, 1, 3))  # [B, H, Tp, D]


def _jax_fwd(tab, scale, q, k, v, segment_ids):
    import jax_triton as jt

    c = tab["consts"]
    b, t, hq, d = q.shape
    qh, kh, vh = (_jax_prep(x, c["TP"]) for x in (q, k, v))
    seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
    seg = jnp.pad(seg, ((0, 0), (0, c["TP"] - t)), constant_values=-1)
    o, lse = jt.triton_call(
        qh, kh, vh, seg, jnp.asarray(tab["cols"]), jnp.asarray(tab["cnt"]), kernel=_fwd,
        out_shape=[jax.ShapeDtypeStruct(qh.shape, q.dtype), jax.ShapeDtypeStruct(qh.shape[:3], jnp.float32)],
        grid=(c["NB"], b * hq), scale=scale, W=tab["cols"].shape[-1], D=d, **c)
    return o, lse, (qh, kh, vh, seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _s2(tab, scale, q, k, v, segment_ids):
    o = _jax_fwd(tab, scale, q, k, v, segment_ids)[0]
    return o.transpose(0, 2, 1, 3)[:, : q.shape[1]]


def _s2_f(tab, scale, q, k, v, segment_ids):
    o, lse, prepped = _jax_fwd(tab, scale, q, k, v, segment_ids)
    return o.transpose(0, 2, 1, 3)[:, : q.shape[1]], (o, lse, prepped, segment_ids)


def _s2_b(tab, scale, res, do):
    import jax_triton as jt

    o, lse, (qh, kh, vh, seg), segment_ids = res
    c = tab["consts"]
    b, hq, tp, d = qh.shape
    t, hkv = do.shape[1], kh.shape[1]
    doh = _jax_prep(do, tp)
    delta = jnp.sum(o.astype(jnp.float32) * doh.astype(jnp.float32), -1)
    common = dict(scale=scale, D=d, **c)
    dq = jt.triton_call(qh, kh, vh, doh, lse, delta, seg, jnp.asarray(tab["cols"]), jnp.asarray(tab["cnt"]),
                        kernel=_dq, out_shape=jax.ShapeDtypeStruct(qh.shape, qh.dtype), grid=(c["NB"], b * hq),
                        W=tab["cols"].shape[-1], **common)
    per_q = jax.ShapeDtypeStruct(qh.shape, jnp.float32)  # dK/dV per query head, summed per group below
    dk, dv = jt.triton_call(qh, kh, vh, doh, lse, delta, seg, jnp.asarray(tab["rows"]), jnp.asarray(tab["rcnt"]),
                            kernel=_dkv, out_shape=[per_q, per_q], grid=(c["NB"], b * hq),
                            W=tab["rows"].shape[-1], **common)
    group = lambda x: x.reshape(b, hkv, hq // hkv, tp, d).sum(2).transpose(0, 2, 1, 3)[:, :t].astype(kh.dtype)
    dseg = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq.transpose(0, 2, 1, 3)[:, :t], group(dk), group(dv), dseg


_s2.defvjp(_s2_f, _s2_b)


def attention(q, k, v, pattern, *, segment_ids=None, scale: float | None = None):
    """S2 attention with the Triton kernels through jax_triton (GPU only); arguments as `reference`."""
    if triton is None:
        raise ImportError("impl='triton' needs the triton package (pip install jaxlm[gpu])")
    tab = _Tables(tables(pattern, q.shape[1], q.shape[2], k.shape[2]))
    return _s2(tab, q.shape[-1] ** -0.5 if scale is None else float(scale), q, k, v, segment_ids)


class _Tables(dict):
    """Tables as a nondiff custom_vjp argument (hashed by identity)."""

    __hash__ = object.__hash__


# ---- torch (tests under TRITON_INTERPRET=1, or eager GPU use) -----------------------------------

def torch_attention(q, k, v, pattern, do, *, segment_ids=None, scale: float | None = None):
    """Forward and gradients with torch tensors [B, T, H, D]: returns (o, dq, dk, dv)."""
    import torch

    b, t, hq, d = q.shape
    hkv = k.shape[2]
    tab = tables(pattern, t, hq, hkv)
    c, tp = tab["consts"], tab["consts"]["TP"]
    scale = d**-0.5 if scale is None else float(scale)
    prep = lambda x: torch.nn.functional.pad(x, (0, 0, 0, 0, 0, tp - t)).transpose(1, 2).contiguous()
    qh, kh, vh, doh = (prep(x) for x in (q, k, v, do))
    seg = torch.zeros((b, t), dtype=torch.int32) if segment_ids is None else segment_ids.to(torch.int32)
    seg = torch.nn.functional.pad(seg, (0, tp - t), value=-1).contiguous()
    as_t = lambda a: torch.from_numpy(np.array(a)).to(q.device)
    o = torch.empty_like(qh)
    lse = torch.empty(qh.shape[:3], dtype=torch.float32, device=q.device)
    grid = (c["NB"], b * hq)
    _fwd[grid](qh, kh, vh, seg, as_t(tab["cols"]), as_t(tab["cnt"]), o, lse, scale, W=tab["cols"].shape[-1], D=d, **c)
    delta = (o.float() * doh.float()).sum(-1).contiguous()
    dq = torch.empty_like(qh)
    _dq[grid](qh, kh, vh, doh, lse, delta, seg, as_t(tab["cols"]), as_t(tab["cnt"]), dq, scale,
              W=tab["cols"].shape[-1], D=d, **c)
    dk = torch.empty(qh.shape, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    _dkv[grid](qh, kh, vh, doh, lse, delta, seg, as_t(tab["rows"]), as_t(tab["rcnt"]), dk, dv, scale,
               W=tab["rows"].shape[-1], D=d, **c)
    back = lambda x: x.transpose(1, 2)[:, :t]
    group = lambda x: back(x.reshape(b, hkv, hq // hkv, tp, d).sum(2)).to(k.dtype)
    return back(o), back(dq), group(dk), group(dv)
