"""The preallocated KV cache for generation: plain arrays, so it jits, shards and donates."""

from __future__ import annotations

import jax.numpy as jnp

from jaxlm.model.attention import dtype_of
from jaxlm.model.config import ModelConfig


def init_cache(config: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """k, v: [layers, B, max_len, kv_heads, head_dim]; segment_ids [B, max_len] (0 = empty or
    padding, never attended); index: the next slot to write."""
    dt = dtype or dtype_of(config.dtype)
    shape = (config.num_layers, batch, max_len, config.num_kv_heads, config.head_size)
    return {
        "k": jnp.zeros(shape, dt),
        "v": jnp.zeros(shape, dt),
        "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
        "index": jnp.zeros((), jnp.int32),
    }


def cache_bytes(config: ModelConfig, batch: int, max_len: int, dtype=None) -> int:
    dt = jnp.dtype(dtype or dtype_of(config.dtype))
    return 2 * config.num_layers * batch * max_len * config.num_kv_heads * config.head_size * dt.itemsize
