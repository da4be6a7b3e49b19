"""LoRA (Hu et al., 2021) on any linear layer, and Phi-4-multimodal's mixture of LoRAs: several named
adapters on the same layers, each example routed to one of them (or to none) inside one batch.

A linear layer is a kernel W of shape in + group + out (q: [d] + [] + [Hq, hd]; o: [Hq, hd] + [] + [d];
the fused SwiGLU wi: [d] + [2] + [I], gate and up being two linear layers side by side). Its adapter
is A: in + group + [r] and B: [r] + group + out, and the layer computes

    y = x W + s * (dropout(x) A) B,        s = alpha / r   (alpha / sqrt(r) with use_rslora)

A takes W's input axes and B its output axes (their logical names too), so a sharded model shards its
adapters as it shards the layer. A starts Kaiming-uniform (as peft: U(-1/sqrt(fan_in), 1/sqrt(fan_in))),
B at zero, so a new adapter changes nothing. Adapters are extra parameters of the same modules, at
`<module>/lora/<adapter>/<layer>_a|_b` ('layers/attn/lora/de/q_a'), scanned over layers like the rest.

Routing (`adapter_ids`, one int per example): i selects config.lora.adapters[i], -1 none. Without ids
every example uses the first adapter. Each adapter's update is computed for the whole batch and kept
only on its own rows, so a mixed batch equals every example run alone with its adapter (and the KV
cache path routes the same way: it is the same modules). Static choices are configs over the same
params: `off(config)` is the base model (adapters are not read at all, so it equals the model without
adapters exactly), `only(config, name)` computes one adapter.
"""

from __future__ import annotations

import math
import re
import string

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.model.config import ModelConfig
from jaxlm.model.ops import dtype_of
from jaxlm.pytree import path_str

NONE = -1  # adapter id of an example that uses no adapter
TRAINABLE = r"(^|/)lora/"  # train.trainable of adapter-only training
__all__ = ["NONE", "TRAINABLE", "Lora", "adapter_ids", "base_params", "count", "delta_weights", "index", "is_adapter",
           "join", "merge", "off", "only", "split", "strip", "unmerge", "with_base"]


# ----------------------------------------------------------------------------- the layer
def _equations(n_in: int, n_group: int, n_out: int) -> tuple[str, str]:
    """einsum equations x A -> h and h B -> delta for in/group/out ranks ('btd,dr->btr', 'btr,rhk->bthk')."""
    i, g, o = string.ascii_lowercase[8:8 + n_in], "gh"[:n_group], "uvwxyz"[:n_out]
    return f"bt{i},{i}{g}r->bt{g}r", f"bt{g}r,r{g}{o}->bt{g}{o}"


class _Adapter(nn.Module):
    """One named adapter's A and B for the linear layers of one module."""

    config: ModelConfig

    @nn.compact
    def __call__(self, layer, x, out_shape, axes, n_group, rank, scale, dropout):
        c = self.config
        n_in = x.ndim - 2
        in_shape, group = x.shape[2:], tuple(out_shape[:n_group])
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        init_a = nn.with_logical_partitioning(_uniform(bound), tuple(axes[:n_in + n_group]) + (None,))
        init_b = nn.with_logical_partitioning(nn.initializers.zeros, (None,) + tuple(axes[n_in:]))
        pdt = dtype_of(c.param_dtype)
        a = self.param(f"{layer}_a", init_a, tuple(in_shape) + group + (rank,), pdt)
        b = self.param(f"{layer}_b", init_b, (rank,) + tuple(out_shape), pdt)
        if dropout and self.has_rng("dropout"):  # training (a dropout rng is given)
            keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - dropout, x.shape)
            x = jnp.where(keep, x / (1.0 - dropout), 0).astype(x.dtype)
        eq_a, eq_b = _equations(n_in, n_group, len(out_shape) - n_group)
        h = jnp.einsum(eq_a, x, a.astype(x.dtype))
        return jnp.einsum(eq_b, h, b.astype(x.dtype)) * jnp.asarray(scale, x.dtype)


def _uniform(bound):
    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    return init


class Lora(nn.Module):
    """The adapters of one module's linear layers (every named adapter), called once per layer:
    `lora(layer, x, y, axes, n_group, ctx)` -> y plus the routed updates (y = x W, W's logical `axes`)."""

    config: ModelConfig
    owner: str  # the owning module's parameter path ('layers/attn')

    @nn.compact
    def __call__(self, layer, x, y, axes, n_group, ctx):
        lc = self.config.lora
        path = f"{self.owner}/{layer}"
        ids = ctx.get("adapter_ids")
        total = None
        for i, name in enumerate(lc.adapters):
            if ids is None and i and not self.is_initializing():
                break  # no ids: the first adapter only (init still creates them all)
            s = lc.settings(i, path)
            if s is None:
                continue
            d = _Adapter(self.config, name=name)(layer, x, y.shape[2:], axes, n_group, *s)
            if ids is None:
                if i:
                    continue
            else:
                d = jnp.where((ids == i).reshape((-1,) + (1,) * (d.ndim - 1)), d, 0)
            total = d if total is None else total + d
        return y if total is None else y + total.astype(y.dtype)


def targets(config: ModelConfig, owner: str) -> bool:
    """Whether any linear layer of the module at `owner` ('layers/mlp') carries adapters."""
    from jaxlm.model.config import linear_paths

    lc = config.lora
    return lc.enabled and any(p.startswith(owner + "/") and re.search(lc.target, p) for p in linear_paths(config))


# ----------------------------------------------------------------------------- routing by config
def index(config: ModelConfig, name: str) -> int:
    names = config.lora.adapters
    if not config.lora.enabled or name not in names:
        raise ConfigError(f"adapter {name!r} is not one of the model's adapters "
                          f"{names if config.lora.enabled else '(it has none)'}")
    return names.index(name)


def adapter_ids(config: ModelConfig, names) -> np.ndarray:
    """[B] int32 adapter ids of a list of adapter names (None: no adapter)."""
    return np.asarray([NONE if n is None else index(config, n) for n in names], np.int32)


def off(config: ModelConfig) -> ModelConfig:
    """The base model: the same params work (their adapters are not read)."""
    return config.replace(lora=config.lora.replace(rank=0))


def only(config: ModelConfig, name: str) -> ModelConfig:
    """The model with one adapter `name` (every example uses it; the others are not read)."""
    lc = config.lora
    i = index(config, name)
    pick = {k: (getattr(lc, k)[i],) for k in ("ranks", "alphas", "dropouts") if getattr(lc, k)}
    return config.replace(lora=lc.replace(adapters=(name,), **pick))


# ----------------------------------------------------------------------------- params
def is_adapter(path) -> bool:
    """A parameter path (a jax key path or 'a/b/c') inside an adapter."""
    s = path if isinstance(path, str) else path_str(path)
    return bool(re.search(TRAINABLE, s))


def split(params) -> tuple[dict, dict]:
    """(base params, adapter params): two nested dicts that partition the tree (empty branches dropped)."""
    def go(node, inside):
        if not isinstance(node, dict):
            return (None, node) if inside else (node, None)
        base, ad = {}, {}
        for k, v in node.items():
            b, a = go(v, inside or k == "lora")
            if b is not None and not (isinstance(b, dict) and not b):
                base[k] = b
            if a is not None and not (isinstance(a, dict) and not a):
                ad[k] = a
        return base, ad
    return go(params, False)


def base_params(params) -> dict:
    return split(params)[0]


def with_base(params, base) -> dict:
    """`params` with every base (non-adapter) leaf taken from `base` (same structure as split()[0])."""
    if not isinstance(params, dict):
        return base
    out = {}
    for k, v in params.items():
        if k == "lora":
            out[k] = v
        elif k not in base:
            raise ConfigError(f"the base params have no {k!r}")
        else:
            out[k] = with_base(v, base[k])
    return out


def count(params) -> int:
    """Number of adapter parameters."""
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(split(params)[1]))


def delta_weights(config: ModelConfig, params, name: str) -> dict:
    """{layer path ('layers/attn/q'): s * B A in the kernel's shape (float32, stacked over layers)} of
    adapter `name`."""
    lc = config.lora
    i = index(config, name)
    out = {}
    for owner in ("layers/attn", "layers/mlp"):
        node = params
        for k in owner.split("/"):
            node = node.get(k, {})
        ad = node.get("lora", {}).get(name, {})
        for key in sorted(ad):
            if not key.endswith("_a"):
                continue
            layer = key[:-2]
            a = jnp.asarray(ad[key], jnp.float32)
            b = jnp.asarray(ad[layer + "_b"], jnp.float32)
            w = node[layer]
            n_group = a.ndim + b.ndim - w.ndim - 3  # a: L+in+g+r, b: L+r+g+out, w: L+in+g+out
            n_in = a.ndim - 2 - n_group
            n_out = b.ndim - 2 - n_group
            i_, g, o = string.ascii_lowercase[8:8 + n_in], "gh"[:n_group], "uvwxyz"[:n_out]
            s = lc.settings(i, f"{owner}/{layer}")
            if s is None:
                raise ConfigError(f"the params hold adapter {name!r} on {owner}/{layer}, which model.lora.target "
                                  f"{lc.target!r} does not adapt")
            out[f"{owner}/{layer}"] = jnp.einsum(f"L{i_}{g}r,Lr{g}{o}->L{i_}{g}{o}", a, b,
                                                 precision=jax.lax.Precision.HIGHEST) * s[1]
    return out


def _add_deltas(config: ModelConfig, params, names, sign: float) -> dict:
    out = jax.tree.map(lambda x: x, params)  # a copy of the containers
    for name in names:
        for path, d in delta_weights(config, params, name).items():
            owner, layer = path.rsplit("/", 1)
            node = out
            for k in owner.split("/"):
                node[k] = dict(node[k])
                node = node[k]
            w = node[layer]
            node[layer] = (jnp.asarray(w, jnp.float32) + sign * d).astype(w.dtype)
    return out


def merge(config: ModelConfig, params, names) -> dict:
    """W' = W + s B A for each adapter in `names` (a name or a list: several add up); the adapters
    stay in the tree. Run the result with `off(config)`."""
    return _add_deltas(config, params, [names] if isinstance(names, str) else list(names), 1.0)


def unmerge(config: ModelConfig, params, names) -> dict:
    """The inverse of `merge`: W = W' - s B A."""
    return _add_deltas(config, params, [names] if isinstance(names, str) else list(names), -1.0)


def strip(config: ModelConfig, params) -> tuple[ModelConfig, dict]:
    """(config without adapters, params without adapters)."""
    return off(config), split(params)[0]


def join(base, adapters) -> dict:
    """The union of a base tree and an adapter tree (the inverse of `split`)."""
    if not isinstance(base, dict) or not isinstance(adapters, dict):
        return adapters if adapters is not None else base
    out = dict(base)
    for k, v in adapters.items():
        out[k] = join(base[k], v) if k in base else v
    return out
