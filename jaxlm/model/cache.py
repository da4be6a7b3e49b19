"""The preallocated KV cache for generation: plain arrays, so it jits, shards and donates."""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.model.attention import dtype_of
from jaxlm.model.config import ModelConfig


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """k, v: [layers, B, max_len, kv_heads, head_dim]; segment_ids [B, max_len] (0 = empty or
    padding, never attended); index: the next slot to write."""
    dt = dtype or dtype_of(config.dtype)
    from jaxlm.model import s2

    if s2.compressed(config):
        return s2.init_compressed(config, batch, max_len, dt)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_size)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    """Bytes of all layers' K and V caches (S2-compressed layers counted as compressed)."""
    from jaxlm.model import s2

    return sum(b for _, _, b in s2.layer_cache_bytes(config, batch, max_len, dtype))
