"""Batched sampling with a preallocated KV cache.

Prompts of different lengths are left-padded (padding is segment 0, never attended; positions count
real tokens only), so every row writes the same cache slot at each step. There is one jitted prefill
and one jitted decode loop (a `lax.while_loop` over the decode step, stopping early when every row
has hit a stop token); `Generator.step` exposes the single decode step for streaming.

LongRoPE: a call uses the long factors once its longest position passes
`original_max_position_embeddings`. When decoding crosses that point, the keys already cached were
rotated with the short factors, so the whole cache is recomputed once with the long ones (the same
thing transformers' Phi-3 does), and decoding continues from there.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.model import Decoder, ModelConfig, init_cache
from jaxlm.model.s2 import cache_config, full_layer_bytes, layer_cache_bytes


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # keep the smallest set whose probability reaches top_p; 1 = off

    def __post_init__(self):
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")


def sample_logits(logits, rng, sampling: Sampling):
    """logits [B, V] (float32) -> token ids [B]."""
    if sampling.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k or sampling.top_p < 1.0:
        k = sampling.top_k or logits.shape[-1]
        vals, idx = jax.lax.top_k(logits, min(k, logits.shape[-1]))  # sorted, descending
        if sampling.top_p < 1.0:
            probs = jax.nn.softmax(vals, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly before each token
            vals = jnp.where(before < sampling.top_p, vals, -jnp.inf)  # the first token always stays
        choice = jax.random.categorical(rng, vals, axis=-1)
        return jnp.take_along_axis(idx, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def sample_rows(logits, keys, temperature, top_k, top_p):
    """Per-row sampling settings in one jitted call (continuous batching: every slot has its own).

    logits [B, V] float32; keys [B] (typed PRNG keys); temperature [B] (0 = greedy), top_k [B] int
    (0 = off), top_p [B] (1 = off) -> token ids [B]. Row by row the rule of `sample_logits`: top-k, then
    top-p over the renormalised top-k, then a draw at the row's temperature. Made for the CPU too: the
    cut-offs are found by bisection (no sort of the vocabulary) and the draw is one uniform per row
    through the cumulative distribution (not a Gumbel variate per token)."""
    v = logits.shape[-1]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    x = logits / jnp.where(temperature > 0, temperature, 1.0)[:, None]

    def truncate(x):
        k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
        t_k = _largest_threshold(lambda t: jnp.sum(x >= t[:, None], axis=-1) >= k,
                                 jnp.min(x, axis=-1), jnp.max(x, axis=-1))
        x = jnp.where(x >= t_k[:, None], x, -jnp.inf)
        p = jax.nn.softmax(x, axis=-1)
        t_p = _largest_threshold(lambda t: jnp.sum(jnp.where(p >= t[:, None], p, 0.0), axis=-1) >= top_p,
                                 jnp.zeros_like(top_p), jnp.max(p, axis=-1))
        return jnp.where((p >= t_p[:, None]) | (top_p[:, None] >= 1.0), x, -jnp.inf)

    need = jnp.any((temperature > 0) & ((top_k > 0) | (top_p < 1.0)))
    x = jax.lax.cond(need, truncate, lambda x: x, x)
    cdf = jnp.cumsum(jax.nn.softmax(x, axis=-1), axis=-1)
    u = jax.vmap(lambda k: jax.random.uniform(k))(keys) * cdf[:, -1]
    drawn = jnp.minimum(jnp.sum(cdf <= u[:, None], axis=-1), v - 1).astype(jnp.int32)
    return jnp.where(temperature > 0, drawn, greedy)


def _largest_threshold(ok, lo, hi, iters: int = 40):
    """Per row, (nearly) the largest t in [lo, hi] with ok(t), for ok monotone (true at lo): bisection."""
    def body(_, c):
        lo, hi = c
        mid = (lo + hi) / 2
        good = ok(mid)
        return jnp.where(good, mid, lo), jnp.where(good, hi, mid)

    return jax.lax.fori_loop(0, iters, body, (lo, hi))[0]


@dataclasses.dataclass
class Generation:
    tokens: list[list[int]]  # generated ids per prompt, the stop token included when one was hit
    finished: list[bool]  # True when the row stopped on a stop token
    prefill_seconds: float
    decode_seconds: float
    prompt_tokens: int
    generated_tokens: int
    cache_layers: list = dataclasses.field(default_factory=list)  # [(layer, "full" | "dense" | "s2", KV bytes)]
    cache_full_layer: int = 0  # KV bytes of one uncompressed layer of the same cache (batch x length)


def bucket(n: int, minimum: int = 16) -> int:
    """Round prompt lengths up to a power of two so new lengths rarely trigger a recompile."""
    b = minimum
    while b < n:
        b *= 2
    return b


def left_pad(prompts: Sequence[Sequence[int]], length: int, pad_id: int):
    b = len(prompts)
    tokens = np.full((b, length), pad_id, np.int32)
    seg = np.zeros((b, length), np.int32)
    for i, p in enumerate(prompts):
        if len(p):
            tokens[i, length - len(p):] = p
            seg[i, length - len(p):] = 1
    pos = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, seg, pos


class Generator:
    """Jitted prefill and decode for one model config and one sampling setting."""

    def __init__(self, config: ModelConfig, sampling: Sampling = Sampling(), cache_dtype=None):
        self.config, self.sampling, self.cache_dtype = config, sampling, cache_dtype
        self.model = Decoder(config)
        self.prefill = jax.jit(self._prefill_impl)
        self.step = jax.jit(self._step_impl)
        self.loop = jax.jit(self._loop_impl, static_argnames=("max_new_tokens",))

    # -- pure pieces -------------------------------------------------------------------------
    def _prefill_impl(self, params, tokens, seg, pos, cache, adapter_ids=None):
        logits, cache = self.model.apply({"params": params}, tokens, pos, seg, cache=cache, adapter_ids=adapter_ids)
        return logits[:, -1], cache

    def _step_impl(self, params, cache, tokens, positions, adapter_ids=None):
        """One decode step: tokens [B] at positions [B] -> (logits [B, V], cache). adapter_ids [B]:
        each row's LoRA adapter (jaxlm.model.lora), the same as at prefill."""
        seg = jnp.ones((tokens.shape[0], 1), jnp.int32)
        logits, cache = self.model.apply({"params": params}, tokens[:, None], positions[:, None], seg, cache=cache,
                                         adapter_ids=adapter_ids)
        return logits[:, 0], cache

    def _refill(self, params, cache, history, token, slot, adapter_ids=None):
        """Recompute the whole cache (LongRoPE short -> long switch) with `token` placed at `slot`."""
        b = token.shape[0]
        history = jax.lax.dynamic_update_slice(history, token[:, None], (0, slot))
        seg = jax.lax.dynamic_update_slice(cache["segment_ids"], jnp.ones((b, 1), jnp.int32), (0, slot))
        pos = jnp.maximum(jnp.cumsum(seg, axis=1) - 1, 0) * seg
        fresh = init_cache(self.config, b, history.shape[1], self.cache_dtype)
        hidden, new = self.model.apply({"params": params}, history, pos, seg, cache=fresh, return_hidden=True,
                                       adapter_ids=adapter_ids)
        h = jax.lax.dynamic_slice_in_dim(hidden, slot, 1, axis=1)[:, 0]
        logits = self.model.apply({"params": params}, h, method=Decoder.logits)
        return logits, dict(new, index=slot + 1)

    def _loop_impl(self, params, cache, logits, positions, rng, stop_ids, pad_id, history, adapter_ids=None, *,
                   max_new_tokens):
        b = logits.shape[0]
        c = self.config
        may_switch = c.rope_scaling == "longrope" and history.shape[1] > c.original_max_position_embeddings

        def cond(s):
            return (s["i"] < max_new_tokens) & ~jnp.all(s["done"])

        def body(s):
            rng, sub = jax.random.split(s["rng"])
            tok = sample_logits(s["logits"], sub, self.sampling)
            tok = jnp.where(s["done"], pad_id, tok)
            out = s["out"].at[:, s["i"]].set(tok)
            done = s["done"] | jnp.isin(tok, stop_ids)
            slot = s["cache"]["index"]
            if may_switch:
                logits, cache = jax.lax.cond(
                    jnp.max(s["pos"]) == c.original_max_position_embeddings,
                    lambda: self._refill(params, s["cache"], s["hist"], tok, slot, adapter_ids),
                    lambda: self._step_impl(params, s["cache"], tok, s["pos"], adapter_ids))
            else:
                logits, cache = self._step_impl(params, s["cache"], tok, s["pos"], adapter_ids)
            hist = jax.lax.dynamic_update_slice(s["hist"], tok[:, None], (0, slot))
            return dict(i=s["i"] + 1, cache=cache, logits=logits, pos=s["pos"] + 1, rng=rng, done=done, out=out,
                        hist=hist)

        state = dict(i=jnp.zeros((), jnp.int32), cache=cache, logits=logits, pos=positions, rng=rng,
                     done=jnp.zeros((b,), bool), out=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                     hist=history)
        state = jax.lax.while_loop(cond, body, state)
        return state["out"], state["done"], state["i"]

    # -- the impure driver --------------------------------------------------------------------
    def new_cache(self, batch: int, max_len: int):
        return init_cache(self.config, batch, max_len, self.cache_dtype)

    def generate(self, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop_tokens: Sequence[int] = (), seed: int = 0, pad_id: int | None = None,
                 adapter_ids=None) -> Generation:
        """adapter_ids: one LoRA adapter id per prompt (jaxlm.model.lora; -1 none), or None (the
        model's first adapter, if it has any)."""
        if not prompts:
            raise ConfigError("generate needs at least one prompt")
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pad = self.config.pad_token_id if pad_id is None else pad_id
        p_len = bucket(max(len(p) for p in prompts))
        tokens, seg, pos = left_pad(prompts, p_len, pad)
        cache = self.new_cache(len(prompts), p_len + max_new_tokens)
        t0 = time.perf_counter()
        if adapter_ids is not None:
            adapter_ids = jnp.asarray(np.broadcast_to(np.asarray(adapter_ids, np.int32), (len(prompts),)))
        logits, cache = self.prefill(params, tokens, seg, pos, cache, adapter_ids)
        logits.block_until_ready()
        t1 = time.perf_counter()
        next_pos = jnp.asarray(seg.sum(axis=1), jnp.int32)
        stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
        history = np.concatenate([tokens, np.full((len(prompts), max_new_tokens), pad, np.int32)], axis=1)
        out, done, steps = self.loop(params, cache, logits, next_pos, jax.random.key(seed), stops,
                                      jnp.int32(pad), history, adapter_ids, max_new_tokens=max_new_tokens)
        out, done = np.asarray(out), np.asarray(done)
        t2 = time.perf_counter()
        stop_set = set(int(s) for s in stop_tokens)
        rows = []
        for r in out[:, : int(steps)]:
            row = []
            for t in r.tolist():
                row.append(t)
                if t in stop_set:
                    break
            rows.append(row)
        return Generation(tokens=rows, finished=done.tolist(), prefill_seconds=t1 - t0, decode_seconds=t2 - t1,
                          prompt_tokens=int(seg.sum()), generated_tokens=sum(len(r) for r in rows),
                          cache_layers=layer_cache_bytes(self.config, len(prompts), p_len + max_new_tokens,
                                                         self.cache_dtype),
                          cache_full_layer=full_layer_bytes(self.config, len(prompts), p_len + max_new_tokens,
                                                            self.cache_dtype))


@functools.lru_cache(maxsize=8)
def _generator(config: ModelConfig, sampling: Sampling) -> Generator:
    return Generator(config, sampling)


def generate(config: ModelConfig, params, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, stop_tokens: Sequence[int] = (), seed: int = 0,
             adapter_ids=None) -> Generation:
    """Sample continuations of token-id prompts. Reuses compiled functions across calls. An S2 model
    decodes with its compressed KV cache unless the full cache is smaller at this length. adapter_ids:
    the LoRA adapter of each prompt (jaxlm.model.lora)."""
    max_len = bucket(max((len(p) for p in prompts), default=1)) + max_new_tokens
    gen = _generator(cache_config(config, max_len), Sampling(temperature, top_k, top_p))
    return gen.generate(params, prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, seed=seed,
                        adapter_ids=adapter_ids)
