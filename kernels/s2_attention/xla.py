"""S2 attention as a block gather in plain JAX: runs on every backend, cost ~ active blocks.

A query tile is m consecutive query blocks of one logical head (m * gq * bs rows). Its key blocks, the
union of its rows' CSR lists (c_t blocks), are gathered into one contiguous [c_t * bs, D] slab and the
tile's softmax is computed exactly over it:

    s = q_t K_g^T * scale   (masked: u <= t when causal, u < T, same segment, real slot, row's block)
    o_t = softmax(s) V_g,   lse_t = logsumexp(s)

m trades gathers for compute (DKernel merges query blocks the same way): a tile gathers its blocks once
for m * bs rows, at the price of the blocks in the union that a row skips. `choose_tile_blocks` picks
m from the tables with a cost measured on CPU (S2, 16K: m = 4, 1.28x the active blocks, 3.5x fewer
gathers than m = 1).

Tiles need different c_t, and padding every tile to the widest would waste ~2x on S2 patterns (c grows
with the query position). Tiles are therefore sorted by c_t and cut into a few buckets, each padded
only to its own widest: the work is sum over buckets of (tiles x width), never T^2.

The backward is a custom VJP that recomputes p from the saved log-sum-exp (as flash attention does)
and, per bucket, adds the gathered dK/dV slabs back with one segment sum: nothing of size
active blocks x bs x bs is kept between the passes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..common import NEG_INF as NEG
from .pattern import csr_tables
from .plan import Plan, from_kv_tiles, from_q_tiles, kv_tiles, make_plan, pad_len, q_tiles, row_positions

BIG = 1 << 30  # key position of a padded slot: fails u <= t and u < T


def buckets(widths: np.ndarray, max_buckets: int = 8, slack: float = 0.1) -> list[tuple[np.ndarray, int]]:
    """Split tiles into <= max_buckets groups of similar width (key blocks, max over heads).

    Tiles sorted by width are cut into max_buckets equal groups; then adjacent groups merge while the
    padded work, sum(tiles x width), stays within (1 + slack) of the unmerged one: every group is one
    more copy of the program to compile. Returns [(tile indices ascending, width)].
    """
    order = np.argsort(widths, kind="stable")
    groups = [(p, max(1, int(widths[p].max()))) for p in np.array_split(order, min(max_buckets, len(order)))]
    cost = lambda gs: sum(len(p) * w for p, w in gs)
    budget = (1 + slack) * cost(groups)
    while len(groups) > 1:
        merged = [groups[:i] + [(np.concatenate([groups[i][0], groups[i + 1][0]]), groups[i + 1][1])]
                  + groups[i + 2:] for i in range(len(groups) - 1)]
        best = min(merged, key=cost)
        if cost(best) > budget:
            break
        groups = best
    return [(np.sort(p), w) for p, w in groups]


def tile_tables(pl: Plan, m: int):
    """Merge m query blocks per tile (DKernel's block_m > block_size): the tile reads the union of its
    rows' key blocks. Returns (union counts (Hn, nt), union cols (Hn, nt, W), row mask (Hn, nt, m, W))."""
    nt = -(-pl.num_blocks // m)
    lay = np.zeros((pl.num_logical, nt * m, pl.num_blocks), bool)
    lay[:, : pl.num_blocks] = pl.layout
    lay = lay.reshape(pl.num_logical, nt, m, -1)
    counts, cols = csr_tables(lay.any(2))
    rowmask = np.take_along_axis(lay, np.broadcast_to(cols[:, :, None], (*cols.shape[:2], m, cols.shape[-1])), -1)
    return counts, cols, rowmask & (np.arange(cols.shape[-1]) < counts[..., None, None])


def choose_tile_blocks(pl: Plan, max_buckets: int, gather_cost: float = 0.5, max_rows: int = 512) -> int:
    """Query blocks per tile minimising padded compute + gather_cost x gathered blocks.

    A tile of m blocks gathers its key blocks once for m * bs rows (fewer, larger copies and matmuls)
    but computes the union of its rows' blocks. On CPU gathering a K+V block costs about half of
    computing it (measured), hence gather_cost = 0.5; S2 at 16K picks m = 4.
    """
    best, best_m = None, 1
    for m in (1, 2, 4, 8):
        if m > 1 and (m * pl.tile_rows > max_rows or m > pl.num_blocks):
            break
        counts = tile_tables(pl, m)[0]
        gathered = sum(len(t) * w for t, w in buckets(counts.max(0), max_buckets))
        cost = gathered * (m + gather_cost)
        if best is None or cost < best:
            best, best_m = cost, m
    return best_m


def _take_rows(x, rows: np.ndarray, axis: int):
    """x[..., rows, ...] as a static slice when rows are contiguous, else a gather."""
    if len(rows) and np.array_equal(rows, np.arange(rows[0], rows[0] + len(rows))):
        return jax.lax.slice_in_dim(x, int(rows[0]), int(rows[0]) + len(rows), axis=axis)
    return jnp.take(x, rows, axis=axis)


class _Bucket:
    """Static tables of one bucket of tiles: gathered block indices, key starts, row masks."""

    def __init__(self, pl: Plan, m: int, tables, tiles: np.ndarray, width: int):
        counts, cols, rowmask = (a[:, tiles] for a in tables)
        cols, rowmask = cols[..., :width], rowmask[..., :width]
        real = np.arange(width) < counts[..., None]
        self.m, self.rows = m, tiles
        self.cols = cols.astype(np.int32)  # (Hn, n, W)
        self.flat = (pl.kv_head[:, None, None] * pl.num_blocks + cols).astype(np.int32)
        self.kstart = np.where(real, cols * pl.block_size, BIG).astype(np.int32)
        # Rows that skip a block of the union need a row mask; m = 1 never does (padded slots are BIG).
        self.rowmask = None if (rowmask == real[:, :, None]).all() else rowmask
        self.qpos = (tiles[:, None] * m * pl.block_size + row_positions(pl, m)[None]).astype(np.int32)


def _mask(pl: Plan, bk: _Bucket, seg_q, seg_kb):
    """Bool mask (B or 1, Hn, n, rows, W * bs) of one bucket."""
    bs = pl.block_size
    hn, n, w = bk.kstart.shape
    kpos = (jnp.asarray(bk.kstart)[..., None] + jnp.arange(bs, dtype=jnp.int32)).reshape(hn, n, 1, w * bs)
    qpos = jnp.asarray(bk.qpos)[None, :, :, None]
    mask = kpos <= qpos if pl.causal else kpos < pl.seq_len
    if bk.rowmask is not None:
        rm = jnp.asarray(bk.rowmask)[:, :, :, None, :, None]
        rm = jnp.broadcast_to(rm, (hn, n, bk.m, pl.tile_rows, w, bs)).reshape(hn, n, -1, w * bs)
        mask = mask & rm
    mask = mask[None]
    if seg_q is not None:
        sq = _take_rows(seg_q, bk.rows, 1)  # (B, n, rows)
        sk = jnp.take(seg_kb, jnp.asarray(bk.cols), axis=1)  # (B, Hn, n, W, bs)
        sk = sk.reshape(*sk.shape[:3], -1)
        mask = mask & (sq[:, None, :, :, None] == sk[:, :, :, None, :])
    return mask


def _gather(kf, bk: _Bucket):
    """kf: [B, Hkv * nk, bs, D] -> [B, Hn, n, W * bs, D]."""
    g = jnp.take(kf, jnp.asarray(bk.flat), axis=1)
    return g.reshape(*g.shape[:3], -1, g.shape[-1])


def _seg_tiles(pl: Plan, segment_ids, m: int):
    """Segment ids of the tile rows (B, nt, rows) and of the key blocks (B, nk, bs)."""
    if segment_ids is None:
        return None, None
    b, bs = segment_ids.shape[0], pl.block_size
    nt = -(-pl.num_blocks // m)
    seg = pad_len(segment_ids.astype(jnp.int32), nt * m * bs, value=-1)
    seg_kb = seg[:, : pl.padded_len].reshape(b, pl.num_blocks, bs)
    seg_q = jnp.broadcast_to(seg.reshape(b, nt, m, 1, bs), (b, nt, m, pl.gq, bs)).reshape(b, nt, -1)
    return seg_q, seg_kb


def _forward(pl: Plan, bks, scale, q, k, v, segment_ids):
    m = bks[0].m
    qt = q_tiles(pl, q, m)
    kf, vf = (x.reshape(x.shape[0], -1, *x.shape[3:]) for x in (kv_tiles(pl, k), kv_tiles(pl, v)))
    seg_q, seg_kb = _seg_tiles(pl, segment_ids, m)
    outs, lses = [], []
    for bk in bks:
        qb = _take_rows(qt, bk.rows, 2)
        s = jnp.einsum("bhnrd,bhnkd->bhnrk", qb, _gather(kf, bk), preferred_element_type=jnp.float32)
        s = jnp.where(_mask(pl, bk, seg_q, seg_kb), s * scale, NEG)
        mx = s.max(-1, keepdims=True)
        p = jnp.exp(s - mx)
        den = p.sum(-1, keepdims=True)
        o = jnp.einsum("bhnrk,bhnkd->bhnrd", p.astype(v.dtype), _gather(vf, bk), preferred_element_type=jnp.float32)
        outs.append((o / den).astype(q.dtype))
        lses.append(mx + jnp.log(den))
    o, lse = _unbucket(bks, outs), _unbucket(bks, lses)
    return from_q_tiles(pl, o, m), lse


def _unbucket(bks, parts):
    """Concatenate bucket outputs along the query-block axis, back in block order."""
    x = jnp.concatenate(parts, axis=2)
    order = np.concatenate([bk.rows for bk in bks])
    if np.array_equal(order, np.arange(len(order))):
        return x
    return jnp.take(x, np.argsort(order), axis=2)


def _backward(pl: Plan, bks, scale, q, k, v, segment_ids, o, lse, do):
    m = bks[0].m
    qt, ot, dot = (q_tiles(pl, x, m) for x in (q, o, do))
    kt, vt = kv_tiles(pl, k), kv_tiles(pl, v)
    kf, vf = (x.reshape(x.shape[0], -1, *x.shape[3:]) for x in (kt, vt))
    seg_q, seg_kb = _seg_tiles(pl, segment_ids, m)
    delta = jnp.einsum("bhnrd,bhnrd->bhnr", ot.astype(jnp.float32), dot.astype(jnp.float32))[..., None]
    nflat = kf.shape[1]
    dk = jnp.zeros((q.shape[0], nflat, pl.block_size, q.shape[-1]), jnp.float32)
    dv = jnp.zeros_like(dk)
    dqs = []
    for bk in bks:
        qb, dob = _take_rows(qt, bk.rows, 2), _take_rows(dot, bk.rows, 2)
        kg, vg = _gather(kf, bk), _gather(vf, bk)
        s = jnp.einsum("bhnrd,bhnkd->bhnrk", qb, kg, preferred_element_type=jnp.float32)
        s = jnp.where(_mask(pl, bk, seg_q, seg_kb), s * scale, NEG)
        p = jnp.exp(s - _take_rows(lse, bk.rows, 2))
        dp = jnp.einsum("bhnrd,bhnkd->bhnrk", dob, vg, preferred_element_type=jnp.float32)
        ds = (p * (dp - _take_rows(delta, bk.rows, 2)) * scale).astype(q.dtype)
        dqs.append(jnp.einsum("bhnrk,bhnkd->bhnrd", ds, kg, preferred_element_type=jnp.float32).astype(q.dtype))
        dkg = jnp.einsum("bhnrk,bhnrd->bhnkd", ds, qb, preferred_element_type=jnp.float32)
        dvg = jnp.einsum("bhnrk,bhnrd->bhnkd", p.astype(do.dtype), dob, preferred_element_type=jnp.float32)
        seg = jnp.asarray(bk.flat.reshape(-1))
        shape = (dkg.shape[0], -1, pl.block_size, dkg.shape[-1])
        dk = dk + jax.ops.segment_sum(jnp.moveaxis(dkg.reshape(shape), 1, 0), seg, nflat).swapaxes(0, 1)
        dv = dv + jax.ops.segment_sum(jnp.moveaxis(dvg.reshape(shape), 1, 0), seg, nflat).swapaxes(0, 1)
    dq = from_q_tiles(pl, _unbucket(bks, dqs), m)
    hkv = k.shape[2]
    dk = from_kv_tiles(pl, dk.reshape(dk.shape[0], hkv, pl.num_blocks, pl.block_size, -1)).astype(k.dtype)
    dv = from_kv_tiles(pl, dv.reshape(dv.shape[0], hkv, pl.num_blocks, pl.block_size, -1)).astype(v.dtype)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _s2(pl, bks, scale, q, k, v, segment_ids):
    return _forward(pl, bks, scale, q, k, v, segment_ids)[0]


def _s2_fwd(pl, bks, scale, q, k, v, segment_ids):
    o, lse = _forward(pl, bks, scale, q, k, v, segment_ids)
    return o, (q, k, v, segment_ids, o, lse)


def _s2_bwd(pl, bks, scale, res, do):
    q, k, v, segment_ids, o, lse = res
    dq, dk, dv = _backward(pl, bks, scale, q, k, v, segment_ids, o, lse, do)
    dseg = None if segment_ids is None else np.zeros(segment_ids.shape, jax.dtypes.float0)
    return dq, dk, dv, dseg


_s2.defvjp(_s2_fwd, _s2_bwd)


def attention(q, k, v, pattern, *, segment_ids=None, scale: float | None = None, max_buckets: int = 8,
              tile_blocks: int | None = None):
    """S2 attention by gathering each head's active KV blocks (any backend).

    Args:
      q: [B, T, Hq, D]; k, v: [B, T, Hkv, D]; float32 or bfloat16 (softmax in float32).
      pattern: S2Pattern or BlockMask; T may be any length (padded to the block size internally).
      segment_ids: optional int [B, T]; attention stays inside a segment.
      scale: softmax scale, default 1/sqrt(D).
      max_buckets: groups of query tiles of similar width (more: less padding, more ops to compile).
      tile_blocks: query blocks per tile (a power of two); None chooses by `choose_tile_blocks`.
    """
    pl = make_plan(pattern, q.shape[1], q.shape[2], k.shape[2])
    m = tile_blocks or choose_tile_blocks(pl, max_buckets)
    tables = tile_tables(pl, m)
    bks = tuple(_Bucket(pl, m, tables, t, w) for t, w in buckets(tables[0].max(0), max_buckets))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return _s2(pl, bks, scale, q, k, v, segment_ids)
