"""jaxlm's one model: a Phi-3 / Phi-4-mini decoder in Flax linen with pure init/apply.

    >>> from jaxlm.model import ModelConfig, Decoder, init_params, forward
    >>> cfg = ModelConfig(vocab_size=256, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2)
    >>> params = init_params(cfg, jax.random.key(0))
    >>> logits = forward(cfg, params, tokens)          # [B, T, V] float32
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.model.cache import cache_bytes, init_cache
from jaxlm.model.config import AttentionConfig, ConfigError, LoraConfig, ModelConfig
from jaxlm.model.decoder import Decoder, positions_from_segments

__all__ = [
    "AttentionConfig", "ConfigError", "Decoder", "LoraConfig", "ModelConfig", "cache_bytes", "forward", "init_cache",
    "init_params", "logical_axes", "positions_from_segments",
]


def _dummy_tokens():
    return jnp.zeros((1, 1), jnp.int32)


@functools.partial(jax.jit, static_argnums=0)
def init_params(config: ModelConfig, rng) -> dict:
    """Plain (unboxed) parameter pytree {'embedding', 'layers', 'final_norm', ['lm_head']}."""
    variables = Decoder(config).init(rng, _dummy_tokens())
    return nn.meta.unbox(variables["params"])


def logical_axes(config: ModelConfig) -> dict:
    """The parameter pytree with each leaf replaced by its tuple of logical axis names."""
    boxed = jax.eval_shape(lambda: Decoder(config).init(jax.random.key(0), _dummy_tokens()))["params"]
    return nn.get_partition_spec(boxed)


@functools.partial(jax.jit, static_argnums=0)
def forward(config: ModelConfig, params, tokens, positions=None, segment_ids=None, adapter_ids=None):
    """Logits [B, T, V] (float32) for tokens [B, T]; see `Decoder` for positions, segment_ids and
    adapter_ids (LoRA routing, jaxlm.model.lora). Jitted (the config is static), so repeated calls with
    the same shapes reuse one compilation."""
    return Decoder(config).apply({"params": params}, tokens, positions, segment_ids, adapter_ids=adapter_ids)
