"""Generation over inputs far longer than the context: chunked prefill into a datastore, then decoding
with kNN-retrieval attention (Unlimiformer, Bertsch et al., 2023; decoder-only: Ahrabian et al., 2024).

1. Datastore (chunked prefill). The input of n tokens is cut into windows of the context length C
   (`retrieval.context`, default max_position_embeddings) that overlap by O tokens (`retrieval.overlap`):
   window 0 reads [0, C) and keeps all of it; window i > 0 reads [C + (i-1)(C-O) - O, ... + C) and keeps
   only its last C - O tokens, so every input token is encoded exactly once, with at least O tokens of
   left context (the first C with all of theirs). A window is encoded with causal attention at
   positions 0..C-1, padded on the right to C so one jitted function encodes them all, `encode_batch`
   windows per call. For every retrieval layer the datastore stores that layer's attention input (the
   normed hidden state x, d numbers per token); keys and values are recomputed from x when retrieved
   (jaxlm.model.retrieval explains the query folding and the RoPE handling).

2. Local window. The last w = min(window, n) input tokens are encoded again, now in the cache with
   retrieval attention (the retrieval layers attend to their top-k entries + the window, the other
   layers to the window only), and the generated tokens join them in the local cache of w + N slots.
   Datastore entries of those w tokens are masked from the search, so nothing is attended twice.

3. Positions (the model never sees a position >= C). With N = max_new_tokens and m = n - w searchable
   entries:
     * n + N <= C: exact positions, entry i at i, the window at m..n-1, generated tokens after;
     * otherwise the searchable prefix is rescaled into [0, P), P = C - window - N: entry i at
       floor(i * P / m); the window takes P, P+1, ... and generated tokens follow, ending at C - 1.
   (Unlimiformer rescales the positions of retrieved keys the same way for RoPE models.) Retrieved keys
   are rotated at these positions, so the query sees retrieved tokens "before" the window, in order.

4. Decoding reuses jaxlm.infer.generate.Generator's jitted `lax.while_loop` (sampling, stop tokens) with
   (params, datastore) as its parameters: one compilation per datastore size bucket, no re-trace per step.

Costs per generated token: the search reads the datastore once per retrieval layer (L_ret * S * d) and
the attention k + w + N entries, so time and memory grow linearly with the input, not with n^2.
Batch size is one long input; LongRoPE models need C <= original_max_position_embeddings.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.infer.generate import Generation, Generator, Sampling, _bucket, left_pad
from jaxlm.model import Decoder, ModelConfig
from jaxlm.model.config import ConfigError
from jaxlm.model.retrieval import datastore_bytes, make_datastore, shard_datastore


@dataclasses.dataclass(frozen=True)
class Window:
    read: int  # first token the window reads (its left context starts here)
    keep: int  # first token it keeps (encoded for the first time)
    end: int  # one past its last token


def chunk_windows(n: int, context: int, overlap: int) -> list[Window]:
    """The prefill windows of an n-token input; their [keep, end) ranges tile [0, n) exactly once."""
    if not 0 <= overlap < context:
        raise ValueError(f"overlap {overlap} must be in [0, context={context})")
    out, keep = [], 0
    while keep < n:
        read = max(0, keep - overlap)
        end = min(n, read + context)
        out.append(Window(read, keep, end))
        keep = end
    return out


def position_plan(n: int, window: int, max_new_tokens: int, context: int):
    """(pos [n] int32 of the datastore entries, first position of the local window, exact?) - rule 3."""
    w = min(window, n)
    m = n - w
    if n + max_new_tokens <= context:
        return np.arange(n, dtype=np.int32), m, True
    p = context - window - max_new_tokens
    if p < 1:
        raise ConfigError(f"model.attention.retrieval.window {window} + max_new_tokens {max_new_tokens} must be "
                          f"below the context {context}: no positions are left for the retrieved entries")
    pos = np.full(n, p, np.int32)  # window entries: masked from the search, their position is unused
    pos[:m] = (np.arange(m, dtype=np.int64) * p) // max(m, 1)
    return pos, p, False


def as_retrieval(config: ModelConfig) -> ModelConfig:
    """The same model with the retrieval attention core (same params: without a datastore it is dense)."""
    if config.attention.impl == "retrieval":
        return config
    return config.replace(attention=dataclasses.replace(config.attention, impl="retrieval"))


@dataclasses.dataclass
class LongGeneration(Generation):
    datastore_seconds: float = 0.0  # chunked prefill (included in prefill_seconds)
    datastore_bytes: int = 0
    windows: int = 0  # prefill windows encoded
    exact_positions: bool = True


class LongGenerator(Generator):
    """Jitted datastore encoder, window prefill and decode loop for one config and sampling setting."""

    def __init__(self, config: ModelConfig, sampling: Sampling = Sampling(), cache_dtype=None, encode_batch: int = 4):
        config = as_retrieval(config)
        super().__init__(config, sampling, cache_dtype)
        r = config.attention.retrieval
        self.context = r.context or config.max_position_embeddings
        if config.rope_scaling == "longrope" and self.context > config.original_max_position_embeddings:
            raise ConfigError("model.attention.retrieval.context must be <= original_max_position_embeddings for "
                              "LongRoPE models (one set of factors for the datastore and the window)")
        self.layers = r.retrieval_layers(config.num_layers)
        self.encode_batch = encode_batch
        self.encoder = Decoder(config, collect=True)
        self._encode = jax.jit(self._encode_impl, donate_argnums=1)
        self._window = jax.jit(self._window_impl)

    # -- pure pieces -------------------------------------------------------------------------
    def _encode_impl(self, params, store, tokens, seg, rows, offset):
        """Encode windows tokens [G, C] (seg 0 = right padding) and write the kept rows (flat indices
        into the G*C window tokens, kept ones first) into store [L_ret, 1, S + G*C, d] at offset."""
        g, c = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[None], (g, c))
        _, collected = self.encoder.apply({"params": params}, tokens, pos, seg, return_hidden=True)
        x = collected[jnp.asarray(self.layers)].reshape(len(self.layers), g * c, -1)
        x = jnp.take(x, rows, axis=1)[:, None].astype(store.dtype)
        return jax.lax.dynamic_update_slice(store, x, (0, 0, offset, 0))

    def _window_impl(self, pr, tokens, seg, pos, cache):
        params, rctx = pr
        return self.model.apply({"params": params}, tokens, pos, seg, cache=cache, retrieval=rctx)

    def _step_impl(self, pr, cache, tokens, positions):
        """Generator's decode step with (params, datastore) as the parameters."""
        params, rctx = pr
        seg = jnp.ones((tokens.shape[0], 1), jnp.int32)
        logits, cache = self.model.apply({"params": params}, tokens[:, None], positions[:, None], seg, cache=cache,
                                         retrieval=rctx)
        return logits[:, 0], cache

    # -- the impure driver --------------------------------------------------------------------
    def datastore(self, params, ids: Sequence[int], max_new_tokens: int, mesh=None, axis="data"):
        """(rctx, info) for one input: the chunked prefill (rule 1) with positions by rule 3."""
        c, r = self.config, self.config.attention.retrieval
        n = len(ids)
        wins = chunk_windows(n, self.context, r.overlap)
        pos, start, exact = position_plan(n, r.window, max_new_tokens, self.context)
        size = _bucket(max(n, r.top_k), 256)
        if mesh is not None:
            size = -(-size // mesh.size) * mesh.size
        g, ctx = self.encode_batch, self.context
        dt = self.cache_dtype or jnp.dtype(c.dtype)
        store = jnp.zeros((len(self.layers), 1, size + g * ctx, c.hidden_size), dt)
        ids = np.asarray(ids, np.int32)
        for b in range(0, len(wins), g):
            group = wins[b:b + g]
            tokens = np.full((g, ctx), c.pad_token_id, np.int32)
            seg = np.zeros((g, ctx), np.int32)
            rows = np.zeros(g * ctx, np.int32)
            kept = []
            for i, w in enumerate(group):
                tokens[i, : w.end - w.read] = ids[w.read:w.end]
                seg[i, : w.end - w.read] = 1
                kept += range(i * ctx + w.keep - w.read, i * ctx + w.end - w.read)
            rows[: len(kept)] = kept
            store = self._encode(params, store, tokens, seg, rows, np.int32(group[0].keep))
        h = store[:, :, :size]
        w = min(r.window, n)
        valid = np.zeros((1, size), bool)
        valid[0, : n - w] = True
        p = np.zeros((1, size), np.int32)
        p[0, :n] = pos
        rctx = make_datastore(c, h, valid, p)
        if mesh is not None:
            rctx = shard_datastore(rctx, mesh, axis)
        return rctx, {"windows": len(wins), "start": start, "exact": exact, "local": w}

    def _local(self, params, rctx, ids, info, max_new_tokens):
        """Left-padded window tokens, positions and an empty cache of window + max_new_tokens slots."""
        r = self.config.attention.retrieval
        tokens, seg, pos = left_pad([list(ids[len(ids) - info["local"]:])], r.window, self.config.pad_token_id)
        pos = (pos + info["start"]) * seg
        return tokens, seg, pos, self.new_cache(1, r.window + max_new_tokens)

    def prompt_logits(self, params, ids: Sequence[int], max_new_tokens: int = 1, mesh=None):
        """Logits [w, V] of the last w = min(window, n) input tokens under retrieval attention."""
        rctx, info = self.datastore(params, ids, max_new_tokens, mesh)
        tokens, seg, pos, cache = self._local(params, rctx, ids, info, max_new_tokens)
        logits, _ = self._window((params, rctx), tokens, seg, pos, cache)
        return logits[0, tokens.shape[1] - info["local"]:]

    def generate(self, params, ids: Sequence[int], *, max_new_tokens: int, stop_tokens: Sequence[int] = (),
                 seed: int = 0, mesh=None, axis="data") -> LongGeneration:
        """Sample up to max_new_tokens after one long input `ids` (any length)."""
        if not len(ids):
            raise ValueError("generate_long needs a non-empty input")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        pad = self.config.pad_token_id
        t0 = time.perf_counter()
        rctx, info = self.datastore(params, ids, max_new_tokens, mesh, axis)
        jax.block_until_ready(rctx)
        t1 = time.perf_counter()
        tokens, seg, pos, cache = self._local(params, rctx, ids, info, max_new_tokens)
        logits, cache = self._window((params, rctx), tokens, seg, pos, cache)
        logits = logits[:, -1]
        logits.block_until_ready()
        t2 = time.perf_counter()
        next_pos = jnp.asarray([info["start"] + info["local"]], jnp.int32)
        stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
        history = np.concatenate([tokens, np.full((1, max_new_tokens), pad, np.int32)], axis=1)
        out, done, steps = self._loop((params, rctx), cache, logits, next_pos, jax.random.key(seed), stops,
                                      jnp.int32(pad), history, max_new_tokens=max_new_tokens)
        out, done = np.asarray(out), np.asarray(done)
        t3 = time.perf_counter()
        stop_set = set(int(s) for s in stop_tokens)
        row = []
        for t in out[0, : int(steps)].tolist():
            row.append(t)
            if t in stop_set:
                break
        return LongGeneration(tokens=[row], finished=done.tolist(), prefill_seconds=t2 - t0, decode_seconds=t3 - t2,
                              prompt_tokens=len(ids), generated_tokens=len(row), datastore_seconds=t1 - t0,
                              datastore_bytes=datastore_bytes(rctx), windows=info["windows"],
                              exact_positions=info["exact"])


_GENERATORS: dict = {}


def generate_long(config: ModelConfig, params, prompt_ids: Sequence[int], *, max_new_tokens: int,
                  stop_tokens: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, mesh=None) -> LongGeneration:
    """Continue one input of any length with retrieval attention (settings: config.attention.retrieval).
    Reuses the compiled functions across calls with the same config and sampling."""
    key = (config, Sampling(temperature, top_k, top_p))
    if key not in _GENERATORS:
        if len(_GENERATORS) >= 8:
            _GENERATORS.pop(next(iter(_GENERATORS)))
        _GENERATORS[key] = LongGenerator(config, key[1])
    return _GENERATORS[key].generate(params, prompt_ids, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens,
                                     seed=seed, mesh=mesh)
