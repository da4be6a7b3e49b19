"""S2-Attention inside the model (Lin et al., 2024): the pattern from the config, hybrid dense layers,
the training core (the kernels of jaxlm.kernels.s2_attention) and KV-efficient decoding.

Patterns are defined per KV head (GQA keeps its memory savings) with DKernel's shift
s = max(1, vert_stride // num_heads) over QUERY heads. In training the pattern is laid over the row's
slots (for an unpacked row, slot = position); in generation over each sequence's positions, so a
left-padded batch row behaves like its prompt alone.

Compressed KV cache. A sparse KV head h attends key block j from query block i iff j <= i and
(i - j < local_blocks or (j + h*s + offset) % vert_stride == 0). Once the query has moved past block
i, a non-vertical block older than the local window is never read again, so each sparse layer keeps,
per KV head, a ring of the last `local_blocks` blocks plus one slot per vertical block:
about local_blocks + i / vert_stride blocks instead of i. Dense layers (and models with dense heads)
keep the full cache. Layers of the two kinds have different cache shapes, so those caches travel in
the scan's carry with per-layer slot tables.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.kernels.s2_attention import S2Pattern, s2_attention
from jaxlm.model.config import ModelConfig
from jaxlm.model.ops import NEG_INF, attend, dtype_of, write_rows


# ----------------------------------------------------------------------------- pattern
def pattern(config: ModelConfig, seq_len: int):
    s = config.attention.s2
    return S2Pattern(num_heads=config.num_heads, seq_len=seq_len, block_size=s.block_size,
                     local_blocks=s.local_blocks, vert_stride=s.vert_stride, homo_head=s.homo_head,
                     num_kv_heads=config.num_kv_heads, num_dense_heads=s.num_dense_heads,
                     head_sliding_offset=s.head_sliding_offset)


def dense_layers(config: ModelConfig) -> tuple[int, ...]:
    """Layers that stay dense: s2.dense_layers, plus every n-th layer (Phi-3-small's
    dense_attention_every_n_layers: layer i is dense when (i + 1) % n == 0)."""
    s = config.attention.s2
    every = s.dense_every_n
    out = set(s.dense_layers) | ({i for i in range(config.num_layers) if (i + 1) % every == 0} if every else set())
    return tuple(sorted(out))


def slot_tables(config: ModelConfig):
    """(is_dense [L] bool, slot [L] int: index among the layers of its kind)."""
    dense = set(dense_layers(config))
    is_dense = np.array([i in dense for i in range(config.num_layers)])
    slot = np.zeros(config.num_layers, np.int32)
    slot[is_dense] = np.arange(is_dense.sum())
    slot[~is_dense] = np.arange((~is_dense).sum())
    return is_dense, slot


def compressed(config: ModelConfig) -> bool:
    s = config.attention.s2
    return config.attention.impl == "s2" and s.compressed_cache and s.num_dense_heads == 0


def cache_config(config: ModelConfig, max_len: int) -> ModelConfig:
    """`config`, or the same model decoding with its full cache when the compressed one would not be
    smaller at max_len (short generations: the ring, vertical and spare slots outnumber the positions).
    Both caches give the same tokens; only memory differs."""
    if not compressed(config):
        return config
    _, _, ns = cache_layout(config, max_len)
    if ns * config.attention.s2.block_size < max_len:
        return config
    return config.replace(attention=dataclasses.replace(
        config.attention, s2=dataclasses.replace(config.attention.s2, compressed_cache=False)))


def block_allowed(config: ModelConfig, qb, kb):
    """S2 rule per KV head: bool [Hkv, *broadcast(qb, kb)] for query blocks qb and key blocks kb."""
    s = config.attention.s2
    hkv = config.num_kv_heads
    h = jnp.zeros(hkv, jnp.int32) if s.homo_head else jnp.arange(hkv)
    h = h.reshape((hkv,) + (1,) * max(jnp.ndim(qb), jnp.ndim(kb)))
    shift = max(1, s.vert_stride // config.num_heads)
    order = kb <= qb
    local = order & (qb - kb < s.local_blocks)
    vert = order & ((kb + h * shift + s.head_sliding_offset) % s.vert_stride == 0)
    dense_head = h >= hkv - s.num_dense_heads
    return local | vert | (dense_head & order)


def position_mask(config: ModelConfig, q_pos, k_pos, base_mask):
    """base mask [B|1, Tq, Tk] and the S2 rule on positions -> [B, Hkv, Tq, Tk]."""
    bs = config.attention.s2.block_size
    rule = block_allowed(config, (q_pos // bs)[:, :, None], (k_pos // bs)[:, None, :])  # [Hkv, B, Tq, Tk]
    return base_mask[:, None] & jnp.moveaxis(rule, 0, 1)


# ----------------------------------------------------------------------------- training / full sequences
def train_core(config: ModelConfig, q, k, v, mask, segment_ids, layer):
    """Attention over whole rows: the S2 kernel for sparse layers, dense attention for dense layers."""
    is_dense, _ = slot_tables(config)
    pat = pattern(config, q.shape[1])

    def sparse():
        return s2_attention(q, k, v, pat, segment_ids=segment_ids, impl=config.attention.s2.kernel).astype(q.dtype)

    if not is_dense.any():
        return sparse()
    if is_dense.all():
        return attend(q, k, v, mask)
    return jax.lax.cond(jnp.asarray(is_dense)[layer], lambda: attend(q, k, v, mask), sparse)


def full_cache_core(config: ModelConfig, q, k, v, mask, ctx, layer):
    """Decoding with the full cache and the S2 mask (positions of cached slots from their segments)."""
    is_dense, _ = slot_tables(config)
    k_seg = ctx["k_seg"]
    k_pos = jnp.maximum(jnp.cumsum(k_seg > 0, axis=1) - 1, 0)
    m = position_mask(config, ctx["positions"], k_pos, mask)
    if not is_dense.any():
        return attend(q, k, v, m)
    return jax.lax.cond(jnp.asarray(is_dense)[layer], lambda: attend(q, k, v, mask),
                        lambda: attend(q, k, v, m))


# ----------------------------------------------------------------------------- compressed cache
@functools.lru_cache(maxsize=32)
def cache_layout(config: ModelConfig, max_len: int):
    """(vertical slots, ring slots, total slots incl. one trash slot) per sparse layer and KV head."""
    s = config.attention.s2
    nb = -(-max_len // s.block_size)
    n_vert = -(-nb // s.vert_stride) + 1
    ring = s.local_blocks
    return n_vert, ring, n_vert + ring + 1


def init_compressed(config: ModelConfig, batch: int, max_len: int, dtype) -> dict:
    is_dense, _ = slot_tables(config)
    n_dense, n_sparse = int(is_dense.sum()), int((~is_dense).sum())
    _, _, ns = cache_layout(config, max_len)
    hkv, hd, bs = config.num_kv_heads, config.head_size, config.attention.s2.block_size
    return {
        "k": jnp.zeros((n_dense, batch, max_len, hkv, hd), dtype),
        "v": jnp.zeros((n_dense, batch, max_len, hkv, hd), dtype),
        "ks": jnp.zeros((n_sparse, batch, hkv, ns, bs, hd), dtype),
        "vs": jnp.zeros((n_sparse, batch, hkv, ns, bs, hd), dtype),
        "blk": jnp.full((n_sparse, batch, hkv, ns), -1, jnp.int32),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def full_layer_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    """Bytes of one layer's uncompressed K and V cache."""
    item = jnp.dtype(dtype or dtype_of(config.dtype)).itemsize
    return 2 * batch * max_len * config.num_kv_heads * config.head_size * item


def layer_cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None) -> list[tuple[int, str, int]]:
    """[(layer, "full" | "dense" | "s2", bytes of its K and V cache)] for decoding up to max_len tokens
    ("full": no compressed cache in this model; "dense"/"s2": the dense and compressed layers of one)."""
    item = jnp.dtype(dtype or dtype_of(config.dtype)).itemsize
    hkv, hd = config.num_kv_heads, config.head_size
    full = full_layer_bytes(config, batch, max_len, dtype)
    if not compressed(config):
        return [(i, "full", full) for i in range(config.num_layers)]
    _, _, ns = cache_layout(config, max_len)
    sparse = 2 * batch * hkv * ns * config.attention.s2.block_size * hd * item
    is_dense, _ = slot_tables(config)
    return [(i, "dense" if d else "s2", full if d else sparse) for i, d in enumerate(is_dense)]


def _write_slots(config: ModelConfig, pos, real, max_len):
    """Where each token goes: ring slots and vertical slots [B, Hkv, T] (trash slot when unused)."""
    s = config.attention.s2
    n_vert, ring, ns = cache_layout(config, max_len)
    trash = ns - 1
    hkv = config.num_kv_heads
    h = (jnp.zeros(hkv, jnp.int32) if s.homo_head else jnp.arange(hkv))[None, :, None]
    shift = max(1, s.vert_stride // config.num_heads)
    j = (pos // s.block_size)[:, None, :]  # [B, 1, T]
    jmax = jnp.max(jnp.where(real, pos, 0), axis=1)[:, None, None] // s.block_size
    ok = real[:, None, :]
    ring_slot = jnp.where(ok & (j > jmax - ring), n_vert + j % ring, trash)  # older blocks would collide
    r = (-(h * shift + s.head_sliding_offset)) % s.vert_stride
    is_vert = (j + h * shift + s.head_sliding_offset) % s.vert_stride == 0
    vert_slot = jnp.where(ok & is_vert, (j - r) // s.vert_stride, trash)
    return jnp.broadcast_to(ring_slot, vert_slot.shape), vert_slot


def _write(ks, vs, blk, k, v, pos, slots, block_size):
    b, t = pos.shape
    hkv = k.shape[2]
    bi = jnp.arange(b)[:, None, None]
    hi = jnp.arange(hkv)[None, :, None]
    off = (pos % block_size)[:, None, :]
    kk, vv = jnp.moveaxis(k, 1, 2), jnp.moveaxis(v, 1, 2)  # [B, Hkv, T, D]
    ks = ks.at[bi, hi, slots, off].set(kk.astype(ks.dtype))
    vs = vs.at[bi, hi, slots, off].set(vv.astype(vs.dtype))
    blk = blk.at[bi, hi, slots].set(jnp.broadcast_to((pos // block_size)[:, None, :], slots.shape))
    return ks, vs, blk


def compressed_core(config: ModelConfig, q, k, v, mask, ctx, layer, carried, max_len):
    """Attention of one layer in compressed-cache mode; returns (output, updated carried caches).

    Prefill (several new tokens, from an empty cache) attends the new tokens with the S2 mask and
    fills the cache; each later step (one token) attends the compressed cache."""
    is_dense, slot = slot_tables(config)
    pos, real = ctx["positions"], ctx["q_seg"] > 0
    idx = ctx["index"]
    tq = q.shape[1]

    def dense_branch(carried):
        sl = jnp.asarray(slot)[layer]
        kc = write_rows(carried["k"][sl], k, idx)
        vc = write_rows(carried["v"][sl], v, idx)
        o = attend(q, kc.astype(q.dtype), vc.astype(q.dtype), mask)
        return o, dict(carried, k=carried["k"].at[sl].set(kc), v=carried["v"].at[sl].set(vc))

    def sparse_branch(carried):
        sl = jnp.asarray(slot)[layer]
        ks, vs, blk = carried["ks"][sl], carried["vs"][sl], carried["blk"][sl]
        ring_slots, vert_slots = _write_slots(config, pos, real, max_len)
        bs = config.attention.s2.block_size
        ks, vs, blk = _write(ks, vs, blk, k, v, pos, ring_slots, bs)
        ks, vs, blk = _write(ks, vs, blk, k, v, pos, vert_slots, bs)
        trash = blk.shape[-1] - 1
        blk = blk.at[:, :, trash].set(-1)
        if tq > 1:  # prefill from an empty cache: the new tokens (slots 0..tq) among themselves
            o = attend(q, k, v, position_mask(config, pos, pos, mask[:, :, :tq]))
        else:
            o = _attend_compressed(config, q, ks, vs, blk, pos[:, 0], max_len)
        new = dict(carried, ks=carried["ks"].at[sl].set(ks), vs=carried["vs"].at[sl].set(vs),
                   blk=carried["blk"].at[sl].set(blk))
        return o, new

    if not is_dense.any():
        return sparse_branch(carried)
    return jax.lax.cond(jnp.asarray(is_dense)[layer], dense_branch, sparse_branch, carried)


def _attend_compressed(config, q, ks, vs, blk, q_pos, max_len):
    """One query per row against the compressed cache: q [B, 1, Hq, D], q_pos [B]."""
    s = config.attention.s2
    n_vert, ring, ns = cache_layout(config, max_len)
    b, _, hq, d = q.shape
    hkv, bs = ks.shape[1], s.block_size
    i = (q_pos // bs)[:, None, None]
    slot = jnp.arange(ns)[None, None, :]
    valid_slot = (blk >= 0) & (slot < ns - 1) & ((slot >= n_vert) | (blk < i - ring + 1))
    kpos = blk[..., None] * bs + jnp.arange(bs)
    valid = valid_slot[..., None] & (kpos <= q_pos[:, None, None, None])
    keys = ks.reshape(b, hkv, ns * bs, d).astype(q.dtype)
    vals = vs.reshape(b, hkv, ns * bs, d).astype(q.dtype)
    qg = q.reshape(b, hkv, hq // hkv, d)
    sc = jnp.einsum("bhgd,bhkd->bhgk", qg, keys, preferred_element_type=jnp.float32) * d ** -0.5
    sc = jnp.where(valid.reshape(b, hkv, 1, ns * bs), sc, NEG_INF)
    p = jax.nn.softmax(sc, axis=-1).astype(vals.dtype)
    o = jnp.einsum("bhgk,bhkd->bhgd", p, vals, preferred_element_type=jnp.float32)
    return o.reshape(b, 1, hq, d).astype(q.dtype)
