"""How a pattern maps onto the kernels' blocks: padding, GQA head grouping and per-head tables.

All kernels work on "logical heads" n = 0..Hn-1. A logical head holds gq query heads that share both
their KV head and their pattern, stacked as gq * block_size rows of one query tile, so that a KV block
is loaded once per group (GQA's saving survives sparsity):

    layout heads 1 or Hkv  ->  gq = Hq // Hkv, Hn = Hkv, kv(n) = n
    layout heads Hq        ->  gq = 1,         Hn = Hq,  kv(n) = n // (Hq // Hkv)

Row r of a query tile is query head n * gq + r // bs at token i * bs + r % bs.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from .pattern import csc_tables, csr_tables
from .reference import layout_head_index


@dataclasses.dataclass(frozen=True, eq=False)
class Plan:
    seq_len: int  # T, the real length
    block_size: int
    num_blocks: int  # nq = nk = ceil(T / bs)
    causal: bool
    gq: int  # query heads per logical head
    num_logical: int  # Hn
    kv_head: np.ndarray  # (Hn,) KV head of each logical head
    counts: np.ndarray  # (Hn, nq) CSR counts
    cols: np.ndarray  # (Hn, nq, maxk) CSR key blocks, padded with the row's last block
    row_counts: np.ndarray  # (Hn, nk) CSC counts
    rows: np.ndarray  # (Hn, nk, maxq) CSC query blocks
    layout: np.ndarray  # (Hn, nq, nk) bool block layout

    @property
    def kv_ratio(self) -> int:
        """Logical heads per KV head: kv(n) = n // kv_ratio."""
        return self.num_logical // (int(self.kv_head.max()) + 1)

    @property
    def padded_len(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def tile_rows(self) -> int:
        return self.gq * self.block_size


def make_plan(pattern, seq_len: int, num_q_heads: int, num_kv_heads: int, merge_groups: bool = True) -> Plan:
    """The plan of `pattern` for inputs of length seq_len. merge_groups=False keeps one query head per
    logical head (gq = 1) even when the pattern is shared by a GQA group (kernels whose tile rows must
    be a power of two)."""
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads do not divide {num_q_heads} query heads")
    p = pattern.for_length(seq_len)
    hl = p.layout_heads
    if hl not in (1, num_kv_heads, num_q_heads):
        raise ValueError(f"pattern has {hl} layout heads; need 1, Hkv={num_kv_heads} or Hq={num_q_heads}")
    if getattr(p, "num_heads", num_q_heads) != num_q_heads:
        raise ValueError(f"pattern is for {p.num_heads} query heads, inputs have {num_q_heads}")
    if getattr(p, "num_kv_heads", None) not in (None, num_kv_heads):
        raise ValueError(f"pattern is for {p.num_kv_heads} KV heads, inputs have {num_kv_heads}")
    if hl == num_q_heads or not merge_groups:
        gq, hn = 1, num_q_heads
        kv = np.arange(hn) // (num_q_heads // num_kv_heads)
    else:
        gq, hn = num_q_heads // num_kv_heads, num_kv_heads
        kv = np.arange(hn)
    lh = layout_head_index(hl, hn)
    counts, cols = csr_tables(p)
    rcounts, rows = csc_tables(p)
    return Plan(seq_len, p.block_size, cols.shape[1], p.causal, gq, hn, kv,
                counts[lh], cols[lh], rcounts[lh], rows[lh], p.layout()[lh])


def pad_len(x, length: int, axis: int = 1, value=0):
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)


def q_tiles(pl: Plan, q, m: int = 1):
    """[B, T, Hq, D] -> [B, Hn, ceil(nq / m), m * gq * bs, D]: m query blocks per tile (padded)."""
    b, _, _, d = q.shape
    nt = -(-pl.num_blocks // m)
    q = pad_len(q, nt * m * pl.block_size)
    q = q.reshape(b, nt, m, pl.block_size, pl.num_logical, pl.gq, d)
    return q.transpose(0, 4, 1, 2, 5, 3, 6).reshape(b, pl.num_logical, nt, m * pl.tile_rows, d)


def from_q_tiles(pl: Plan, o, m: int = 1):
    """Inverse of q_tiles, dropping the padding: -> [B, T, Hq, D]."""
    b, _, nt, _, d = o.shape
    o = o.reshape(b, pl.num_logical, nt, m, pl.gq, pl.block_size, d)
    o = o.transpose(0, 2, 3, 5, 1, 4, 6).reshape(b, nt * m * pl.block_size, pl.num_logical * pl.gq, d)
    return o[:, : pl.seq_len]


def kv_tiles(pl: Plan, k):
    """[B, T, Hkv, D] -> [B, Hkv, nk, bs, D] (padded)."""
    b, _, h, d = k.shape
    k = pad_len(k, pl.padded_len)
    return k.reshape(b, pl.num_blocks, pl.block_size, h, d).transpose(0, 3, 1, 2, 4)


def from_kv_tiles(pl: Plan, k):
    b, h, _, _, d = k.shape
    return k.transpose(0, 2, 3, 1, 4).reshape(b, pl.padded_len, h, d)[:, : pl.seq_len]


def row_positions(pl: Plan, m: int = 1) -> np.ndarray:
    """(m * gq * bs,) token offset of each tile row from the tile's first token."""
    bs = pl.block_size
    return (np.arange(m)[:, None, None] * bs + np.zeros((1, pl.gq, 1), int) + np.arange(bs)).reshape(-1)
