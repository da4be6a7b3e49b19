"""S2-Attention block patterns and the tables the kernels read (pure numpy, no jax).

S2-Attention (Lin et al., 2024, "Hardware-Aware Context Sharding Among Attention Heads"; kernels in
DKernel) gives every head a strided shard of the context plus a local window. In units of
`block_size` tokens, query block i of sparse head h attends key block j iff

    j <= i  and  ( i - j < local_blocks  or  (j + h*s + head_sliding_offset) % vert_stride == 0 ),
    s = max(1, vert_stride // num_heads)          (num_heads = QUERY heads, as DKernel does),

and inside the diagonal block the mask is causal per token. Heads are shifted by s blocks, so with
num_heads >= vert_stride the union of heads covers every (i, j <= i): the model sees the whole context
while each head reads ~1/vert_stride of it.

A layout is a bool array (heads, nq, nk) where heads is 1 (one pattern for all heads), the number of
KV heads (one pattern per GQA group) or the number of query heads. The kernels read it through CSR
tables (per head and query block: the key blocks) and the backward dK/dV pass through the transposed
CSC tables (per head and key block: the query blocks).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class S2Pattern:
    """The local + vertical-stride pattern, hashable so that it can be a static jit argument.

    Attributes:
      num_heads: number of query heads. Also sets the per-head shift s = max(1, vert_stride // num_heads)
        even when num_kv_heads is given, as in DKernel, so that DKernel-trained checkpoints keep their
        attention.
      seq_len: sequence length the pattern is built for; nq = nk = ceil(seq_len / block_size).
      block_size: tokens per block; a power of two, at least 16 (the kernels' tile size).
      local_blocks: width of the local window in blocks (the diagonal block counts); >= 1 so that every
        token can attend itself.
      vert_stride: a head attends one key block in every vert_stride outside its local window;
        1 is dense causal attention.
      homo_head: every head uses h = 0 (one pattern, layout heads = 1).
      num_kv_heads: define the pattern per KV head (h runs over KV heads) and share it across that head's
        query group, so that GQA keeps its KV-cache savings. None: one pattern per query head.
      num_dense_heads: the last heads are dense causal (they count KV heads when num_kv_heads is set).
      head_sliding_offset: added to the stride test; 1 gives the vLLM / Phi-3-small variant
        (j + h*s + 1) % vert_stride == 0.
      causal: False gives a bidirectional pattern: |i - j| < local_blocks or the stride test, with no
        per-token causal mask.
    """

    num_heads: int
    seq_len: int
    block_size: int = 64
    local_blocks: int = 4
    vert_stride: int = 8
    homo_head: bool = False
    num_kv_heads: int | None = None
    num_dense_heads: int = 0
    head_sliding_offset: int = 0
    causal: bool = True

    def __post_init__(self):
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {bs}")
        if self.local_blocks < 1:
            raise ValueError(f"local_blocks must be >= 1 (a token must see its own block), got {self.local_blocks}")
        if self.vert_stride < 1:
            raise ValueError(f"vert_stride must be >= 1, got {self.vert_stride}")
        if self.seq_len < 1 or self.num_heads < 1:
            raise ValueError("seq_len and num_heads must be positive")
        kv = self.num_kv_heads
        if kv is not None and (kv < 1 or self.num_heads % kv):
            raise ValueError(f"num_kv_heads={kv} must divide num_heads={self.num_heads}")
        if self.homo_head and self.num_dense_heads:
            raise ValueError("homo_head has one pattern for all heads: num_dense_heads must be 0")
        if not 0 <= self.num_dense_heads <= (kv or self.num_heads):
            raise ValueError(f"num_dense_heads={self.num_dense_heads} out of range")

    @property
    def num_blocks(self) -> int:
        return _cdiv(self.seq_len, self.block_size)

    @property
    def layout_heads(self) -> int:
        """Heads of the compact layout: 1 (homo), num_kv_heads (shared per group) or num_heads."""
        return 1 if self.homo_head else (self.num_kv_heads or self.num_heads)

    def for_length(self, seq_len: int) -> S2Pattern:
        """The same pattern built for another length (the formula does not depend on seq_len)."""
        return self if seq_len == self.seq_len else dataclasses.replace(self, seq_len=seq_len)

    def layout(self) -> np.ndarray:
        """Compact bool layout (layout_heads, nq, nk); cached, read-only."""
        return _s2_layout(self)


def _row_rule(p: S2Pattern, h: int, i, j) -> np.ndarray:
    """The block rule for layout head h, broadcasting over query blocks i and key blocks j."""
    i, j = np.asarray(i), np.asarray(j)
    if p.causal:
        near = (j <= i) & (i - j < p.local_blocks)
        order = j <= i
    else:
        near = np.abs(i - j) < p.local_blocks
        order = np.ones_like(near)
    if h >= p.layout_heads - p.num_dense_heads:
        return order & np.ones_like(near)
    hh = 0 if p.homo_head else h
    s = max(1, p.vert_stride // p.num_heads)
    vert = (j + hh * s + p.head_sliding_offset) % p.vert_stride == 0
    return order & (near | vert)


@functools.lru_cache(maxsize=64)
def _s2_layout(p: S2Pattern) -> np.ndarray:
    n = p.num_blocks
    i, j = np.arange(n)[:, None], np.arange(n)[None, :]
    out = np.stack([_row_rule(p, h, i, j) for h in range(p.layout_heads)])
    out.setflags(write=False)
    return out


def block_layout(num_heads: int, seq_len: int, block_size: int, local_blocks: int, vert_stride: int, *,
                 homo_head: bool = False, num_kv_heads: int | None = None, num_dense_heads: int = 0,
                 head_sliding_offset: int = 0, causal: bool = True) -> np.ndarray:
    """Bool block mask (heads, nq, nk) of the S2 pattern, heads expanded to query heads (1 if homo_head).

    Block (i, j) of head h is True iff j <= i and (i - j < local_blocks or
    (j + h*s + head_sliding_offset) % vert_stride == 0), s = max(1, vert_stride // num_heads).

    Args:
      num_heads: query heads (also sets the shift s, as in DKernel).
      seq_len: tokens; nq = nk = ceil(seq_len / block_size).
      block_size: tokens per block, a power of two >= 16.
      local_blocks: local window in blocks, diagonal included (>= 1).
      vert_stride: one strided key block every vert_stride blocks (1 = dense).
      homo_head: all heads share h = 0 (returns 1 head).
      num_kv_heads: the pattern is defined per KV head (h = KV head) and shared by its query group:
        query head q uses KV head q // (num_heads // num_kv_heads).
      num_dense_heads: the last heads (KV heads when num_kv_heads is set) are dense causal.
      head_sliding_offset: 1 gives the vLLM / Phi-3-small variant.
      causal: False: |i - j| < local_blocks or the stride test, both sides of the diagonal.
    """
    p = S2Pattern(num_heads, seq_len, block_size, local_blocks, vert_stride, homo_head=homo_head,
                  num_kv_heads=num_kv_heads, num_dense_heads=num_dense_heads,
                  head_sliding_offset=head_sliding_offset, causal=causal)
    return expand_heads(p.layout(), num_heads)


def expand_heads(layout: np.ndarray, num_heads: int) -> np.ndarray:
    """Repeat a layout with 1 head or one head per KV group to one head per query head (1 stays 1)."""
    hl = layout.shape[0]
    if hl in (1, num_heads):
        return np.asarray(layout)
    if num_heads % hl:
        raise ValueError(f"layout has {hl} heads, which does not divide num_heads={num_heads}")
    return np.repeat(layout, num_heads // hl, axis=0)


@dataclasses.dataclass(frozen=True, eq=False)
class BlockMask:
    """Any user-supplied bool block mask (heads, nq, nk), hashable by content (a static jit argument).

    heads must be 1, the number of KV heads (shared per GQA group) or the number of query heads.
    The diagonal blocks must be attended (every token must see itself, so that no softmax row is
    empty); with causal=True blocks above the diagonal must be False and the diagonal block is causal
    per token.
    """

    mask: np.ndarray
    block_size: int = 64
    causal: bool = True

    def __post_init__(self):
        m = np.array(self.mask, dtype=bool)
        if m.ndim == 2:
            m = m[None]
        if m.ndim != 3 or m.shape[1] != m.shape[2]:
            raise ValueError(f"block mask must be (heads, n, n), got {m.shape}")
        bs = self.block_size
        if bs < 16 or bs & (bs - 1):
            raise ValueError(f"block_size must be a power of two >= 16, got {bs}")
        if not m[:, np.arange(m.shape[1]), np.arange(m.shape[1])].all():
            raise ValueError("block mask must attend every diagonal block")
        if self.causal and np.triu(m, 1).any():
            raise ValueError("causal block mask has blocks above the diagonal")
        m.setflags(write=False)
        object.__setattr__(self, "mask", m)
        object.__setattr__(self, "_key", (m.shape, np.packbits(m).tobytes(), bs, self.causal))

    def __hash__(self):
        return hash(self._key)

    def __eq__(self, other):
        return isinstance(other, BlockMask) and self._key == other._key

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1] * self.block_size

    @property
    def layout_heads(self) -> int:
        return self.mask.shape[0]

    def for_length(self, seq_len: int) -> BlockMask:
        n = _cdiv(seq_len, self.block_size)
        if n > self.mask.shape[1]:
            raise ValueError(f"block mask covers {self.seq_len} tokens, input has {seq_len}")
        return self if n == self.mask.shape[1] else BlockMask(self.mask[:, :n, :n], self.block_size, self.causal)

    def layout(self) -> np.ndarray:
        return self.mask


def _as_layout(pattern) -> np.ndarray:
    lay = pattern.layout() if hasattr(pattern, "layout") else np.asarray(pattern, dtype=bool)
    return lay[None] if lay.ndim == 2 else lay


# ---- kernel tables -------------------------------------------------------------------------------

def _compress(layout: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per (head, row): count of True columns and their indices, padded to the widest row.

    Padding repeats the row's last index instead of DKernel's -1: a Pallas pipeline then sees the same
    block index again and issues no new copy, and every index stays in bounds for a gather.
    """
    counts = layout.sum(-1).astype(np.int32)
    width = max(1, int(counts.max(initial=0)))
    order = np.argsort(~layout, axis=-1, kind="stable")[..., :width].astype(np.int32)
    slot = np.arange(width)
    last = np.take_along_axis(order, np.maximum(counts - 1, 0)[..., None], -1)
    idx = np.where(slot < counts[..., None], order, last)
    return counts, idx.astype(np.int32)


def csr_tables(pattern) -> tuple[np.ndarray, np.ndarray]:
    """(counts (H, nq), cols (H, nq, maxk)): key blocks of each query block, ascending, padded.

    `pattern`: an S2Pattern / BlockMask (tables cached) or a bool layout array."""
    if hasattr(pattern, "layout"):
        return _tables(pattern, False)
    return _compress(_as_layout(pattern))


def csc_tables(pattern) -> tuple[np.ndarray, np.ndarray]:
    """(counts (H, nk), rows (H, nk, maxq)): query blocks that read each key block (backward dK/dV)."""
    if hasattr(pattern, "layout"):
        return _tables(pattern, True)
    return _compress(np.swapaxes(_as_layout(pattern), -1, -2))


@functools.lru_cache(maxsize=64)
def _tables(pattern, transpose: bool) -> tuple[np.ndarray, np.ndarray]:
    lay = _as_layout(pattern)
    out = _compress(np.swapaxes(lay, -1, -2) if transpose else lay)
    for a in out:
        a.setflags(write=False)
    return out


# ---- properties --------------------------------------------------------------------------------

def _lower(n: int, causal: bool) -> np.ndarray:
    return np.tril(np.ones((n, n), bool)) if causal else np.ones((n, n), bool)


def coverage(pattern, causal: bool = True) -> tuple[bool, np.ndarray]:
    """Does the union over heads attend every (i, j) with j <= i (every (i, j) if not causal)?

    Returns (covered, missed) where missed is an int array (m, 2) of the (i, j) pairs no head attends.
    Full coverage means information from any past block can reach any later block in one layer.
    """
    causal = getattr(pattern, "causal", causal)
    lay = _as_layout(pattern)
    missed = np.argwhere(_lower(lay.shape[1], causal) & ~lay.any(0))
    return len(missed) == 0, missed


def is_kv_cache_efficient(pattern) -> bool:
    """True iff no head needs a key block again after it stopped attending it.

    For j < i: layout[h, i, j] implies layout[h, i - 1, j]. Then the rows that read block j form one
    run starting at the diagonal, and a decoder can evict block j for good the first time it is
    skipped: the KV cache holds exactly the blocks of the current row.
    """
    lay = _as_layout(pattern)
    below = np.tril(np.ones(lay.shape[1:], bool), -1)[1:]
    return bool(np.all(~(lay[:, 1:] & ~lay[:, :-1]) | ~below))


def density(pattern, causal: bool = True) -> float:
    """Attended blocks / blocks of dense (causal) attention, averaged over layout heads."""
    causal = getattr(pattern, "causal", causal)
    lay = _as_layout(pattern)
    return float(lay.sum() / (lay.shape[0] * _lower(lay.shape[1], causal).sum()))


def kv_blocks_to_keep(pattern, kv_head: int, q_block: int, num_kv_heads: int | None = None) -> np.ndarray:
    """Key blocks j <= q_block that KV head `kv_head` must keep in its cache while the query is at
    block q_block or later: the union over its query heads and over rows i >= q_block.

    For an `S2Pattern` the rule is evaluated directly, so q_block may lie beyond seq_len; for a layout
    array the rows it holds are used. For a KV-cache-efficient pattern this is exactly row q_block.
    num_kv_heads: KV heads of the model when the pattern is defined per query head (default: the
    pattern's num_kv_heads, else one KV head per layout head).
    """
    if isinstance(pattern, S2Pattern):
        hl = pattern.layout_heads
        num_kv_heads = num_kv_heads or pattern.num_kv_heads or hl
        i = np.arange(q_block, q_block + pattern.local_blocks + 1)[:, None]
        j = np.arange(q_block + 1)[None]
        # rows past q_block + local_blocks see no local block of [0, q_block] that earlier rows miss
        rule = lambda h: _row_rule(pattern, h, i, j).any(0)
    else:
        lay = _as_layout(pattern)
        hl = lay.shape[0]
        num_kv_heads = num_kv_heads or hl
        rule = lambda h: lay[h, q_block:, : q_block + 1].any(0)
    if hl == 1:
        heads = [0]
    elif hl == num_kv_heads:
        heads = [kv_head]
    else:  # one pattern per query head: the group of kv_head
        g = hl // num_kv_heads
        heads = range(kv_head * g, (kv_head + 1) * g)
    keep = np.zeros(q_block + 1, bool)
    for h in heads:
        keep |= rule(h)
    return np.flatnonzero(keep)
