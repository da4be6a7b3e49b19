"""The small layers of the decoder: parameters with logical axes, RMSNorm and the SwiGLU MLP."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.model import lora
from jaxlm.model.config import ModelConfig
from jaxlm.model.ops import dtype_of


def kernel_param(module: nn.Module, name: str, shape, axes, config: ModelConfig):
    """A weight of `shape` with logical axis names `axes`, normal(init_std) initialised."""
    init = nn.with_logical_partitioning(nn.initializers.normal(config.init_std), axes)
    return module.param(name, init, shape, dtype_of(config.param_dtype))


def bias_param(module: nn.Module, name: str, shape, axes, config: ModelConfig):
    init = nn.with_logical_partitioning(nn.initializers.zeros, axes)
    return module.param(name, init, shape, dtype_of(config.param_dtype))


class RMSNorm(nn.Module):
    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        init = nn.with_logical_partitioning(nn.initializers.ones, ("embed",))
        scale = self.param("scale", init, (x.shape[-1],), dtype_of(c.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + c.rms_norm_eps)
        return (scale.astype(jnp.float32) * y).astype(dtype_of(c.dtype))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), gate and up fused in one kernel or split in two."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x, ctx=None):
        """x [B, T, d] -> [B, T, d]; ctx carries the per-row `adapter_ids` of LoRA (jaxlm.model.lora)."""
        c = self.config
        dt = dtype_of(c.dtype)
        d, m = c.hidden_size, c.intermediate_size
        adapters = lora.Lora(c, "layers/mlp", name="lora") if lora.targets(c, "layers/mlp") else None

        def project(layer, eq, x, w, axes, n_group=0):  # x w, plus the routed LoRA updates (if any)
            y = jnp.einsum(eq, x, w.astype(dt))
            return adapters(layer, x, y, axes, n_group, ctx or {}) if adapters else y

        if c.fused_mlp:  # gate and up side by side: adapters get one A and B per half (n_group=1)
            wi = kernel_param(self, "wi", (d, 2, m), ("embed", None, "mlp"), c)
            h = project("wi", "btd,dkm->btkm", x, wi, ("embed", None, "mlp"), n_group=1)
            gate, up = h[:, :, 0], h[:, :, 1]
        else:
            wg = kernel_param(self, "wi_gate", (d, m), ("embed", "mlp"), c)
            wu = kernel_param(self, "wi_up", (d, m), ("embed", "mlp"), c)
            gate = project("wi_gate", "btd,dm->btm", x, wg, ("embed", "mlp"))
            up = project("wi_up", "btd,dm->btm", x, wu, ("embed", "mlp"))
        h = nn.with_logical_constraint(jax.nn.silu(gate) * up, ("batch", "length", "mlp"))
        wo = kernel_param(self, "wo", (m, d), ("mlp", "embed"), c)
        return nn.with_logical_constraint(project("wo", "btm,md->btd", h, wo, ("mlp", "embed")),
                                          ("batch", "length", "embed"))
