"""Rotary position embeddings: partial rotation, rotate_half layout, LongRoPE, Llama-3 scaling.

Layout follows Phi-3 / Hugging Face: the first `rotary_dim` features of each head are rotated,
pairing feature i with feature i + rotary_dim/2 (`rotate_half`, not interleaved pairs); the rest
pass through unchanged.

LongRoPE (Phi-3 / Phi-4-mini): the inverse frequencies are divided by per-frequency factors. The
long factors are used for a whole call when its longest position exceeds
`original_max_position_embeddings` (max(position) + 1 > orig), else the short ones, exactly as
transformers does. cos and sin are both multiplied by the attention factor
sqrt(1 + ln(max/orig) / ln(orig)).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxlm.model.config import ModelConfig


def inverse_frequencies(config: ModelConfig, factors=None) -> np.ndarray:
    dim = config.rotary_dim
    inv = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    if factors is not None:
        inv = inv / np.asarray(factors, np.float32)
    if config.rope_scaling == "llama3":
        inv = llama3_frequencies(inv, config)
    return inv.astype(np.float32)


def llama3_frequencies(inv: np.ndarray, config: ModelConfig) -> np.ndarray:
    """Llama 3.1's rope scaling: wavelengths longer than orig / low_freq_factor are stretched by
    `factor`, those shorter than orig / high_freq_factor are kept, and the band between is a linear
    blend in orig / wavelength."""
    orig, factor = config.original_max_position_embeddings, config.rope_factor
    low, high = config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelen = 2 * np.pi / inv
    scaled = np.where(wavelen > orig / low, inv / factor, inv)
    smooth = (orig / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= orig / high) & (wavelen <= orig / low)
    return np.where(medium, blended, scaled)


def rope_tables(config: ModelConfig, positions: jnp.ndarray):
    """cos, sin of shape [B, T, rotary_dim // 2] (float32) for integer positions [B, T]."""
    pos = positions.astype(jnp.float32)[..., None]
    if config.rope_scaling == "longrope":
        short = jnp.asarray(inverse_frequencies(config, config.rope_short_factor))
        long = jnp.asarray(inverse_frequencies(config, config.rope_long_factor))
        use_long = jnp.max(positions) + 1 > config.original_max_position_embeddings
        inv = jnp.where(use_long, long, short)
        scale = config.longrope_attention_factor
    else:
        inv = jnp.asarray(inverse_frequencies(config))
        scale = 1.0
    angles = pos * inv
    return jnp.cos(angles) * scale, jnp.sin(angles) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate the first 2 * cos.shape[-1] features of x [B, T, H, D]; cos/sin are [B, T, R/2]."""
    half = cos.shape[-1]
    rot, rest = x[..., : 2 * half], x[..., 2 * half:]
    x1 = rot[..., :half].astype(jnp.float32)
    x2 = rot[..., half:].astype(jnp.float32)
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
    return jnp.concatenate([out, rest], axis=-1) if rest.shape[-1] else out
