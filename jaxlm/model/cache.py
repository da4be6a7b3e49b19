"""The preallocated KV cache for generation: plain arrays, so it jits, shards and donates."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxlm.model import s2
from jaxlm.model.config import ModelConfig
from jaxlm.model.ops import dtype_of


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None, per_row: bool = False) -> dict:
    """k, v: [layers, B, max_len, kv_heads, head_dim]; segment_ids [B, max_len] (0 = empty or
    padding, never attended); index: the next slot to write, one for all rows, or with per_row one
    per row [B] (continuous batching: rows join and leave at different lengths; see `insert_row`)."""
    dt = dtype or dtype_of(config.dtype)
    if s2.compressed(config):
        cache = s2.init_compressed(config, batch, max_len, dt)
    else:
        shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_size)
        cache = {
            "k": jnp.zeros(shape, dt),
            "v": jnp.zeros(shape, dt),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32),
        }
    if per_row:
        cache["index"] = jnp.zeros((batch,), jnp.int32)
    return cache


def insert_row(cache: dict, row: dict, slot, length) -> dict:
    """Row `slot` of a per-row cache replaced by the one-row cache `row` (a prefill of one sequence
    written from slot 0), its next write at `length` (the sequence's real length: a bucketed prefill
    leaves padding, segment 0, after it). `row` may be shorter than the cache along the length axis
    (not for S2-compressed caches, whose layout depends on max_len); the rest of the row is emptied."""
    out = {}
    for name, x in cache.items():
        if name == "index":
            out[name] = x.at[slot].set(length)
        elif name == "segment_ids":
            seg = jax.lax.dynamic_update_slice(jnp.zeros((1, x.shape[1]), x.dtype), row[name].astype(x.dtype), (0, 0))
            out[name] = jax.lax.dynamic_update_slice(x, seg, (slot, 0))
        else:  # k, v (and ks, vs, blk of S2): [layers, B, ...]
            start = (0, slot) + (0,) * (x.ndim - 2)
            out[name] = jax.lax.dynamic_update_slice(x, row[name].astype(x.dtype), start)
    return out


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    """Bytes of all layers' K and V caches (S2-compressed layers counted as compressed)."""
    return sum(b for _, _, b in s2.layer_cache_bytes(config, batch, max_len, dtype))
