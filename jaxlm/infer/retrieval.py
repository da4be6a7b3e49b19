"""Generation over inputs far longer than the context: chunked prefill into a datastore, then decoding
with kNN-retrieval attention (Unlimiformer, Bertsch et al., 2023; decoder-only: Ahrabian et al., 2024).

0. Span. The input ids [0, n) hold a searchable span [a, b) - the long input - and local tokens around
   it: a prefix [0, a) (a chat template's system turn and user header) and a suffix [b, n) (the question,
   the end of the turn, the assistant header). Every layer attends the local tokens through the KV cache;
   the retrieval layers also attend their top-k entries of the span. `chat_input` builds ids and span for
   a chat turn (the input in the user turn, the question after it); without a span the last
   w = min(window, n) tokens are local: span (0, n - w).

1. Datastore (chunked, batched prefill). The tokens [0, b) are cut into windows of the context length C
   (`retrieval.context`, default max_position_embeddings) that overlap by O tokens (`retrieval.overlap`):
   window 0 reads [0, C) and keeps all of it; window i > 0 reads [C + (i-1)(C-O) - O, ... + C) and keeps
   only its last C - O tokens, so every token is encoded exactly once, with at least O tokens of left
   context (the first C with all of theirs). A window is encoded with causal attention at positions
   0..C-1, padded on the right to C (a call of shorter windows - the last one, a short input - to the
   next power of two >= 256 of its longest), several windows per call (`encode_batch`, default
   8192 // C), the attention in query blocks (jaxlm.model.retrieval.local_attention). For every retrieval layer the
   datastore stores that layer's attention input (the normed hidden state x, d numbers per token); keys
   and values are recomputed from x when retrieved (jaxlm.model.retrieval: query folding, RoPE).
   Only the span's entries are searchable.

2. Local cache. The prefix is prefilled with local attention only (it precedes the span), then the suffix
   with retrieval attention, and the generated tokens follow them in a cache of A + S + N slots.

3. Positions (the model never sees a position >= C). With N = max_new_tokens, m = b - a entries and
   L = n - m local tokens:
     * n + N <= C: exact positions, token i at i, generated tokens after;
     * otherwise the prefix keeps 0..a-1, the span is rescaled into [a, a + P), P = C - L - N: entry i
       at a + floor(i * P / m); the suffix takes a + P, a + P + 1, ... and generated tokens follow,
       ending at C - 1.
   (Unlimiformer rescales the positions of retrieved keys the same way for RoPE models.) Retrieved keys
   are rotated at these positions, so the query sees retrieved tokens after the prefix, before the
   suffix, in order.

4. Decoding reuses jaxlm.infer.generate.Generator's jitted `lax.while_loop` (sampling, stop tokens) with
   (params, datastore) as its parameters: one compilation per datastore size, no re-trace per step.

Costs per generated token: the search reads the datastore once per retrieval layer (L_ret * S * d) and
the attention k + L + N entries, so time and memory grow linearly with the input, not with n^2.
Batch size is one long input; LongRoPE models need C <= original_max_position_embeddings.
`generate_dense` is the baseline on the same machinery: plain causal attention over an input that fits.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError, DataError, TokenizerError
from jaxlm.infer.generate import Generation, Generator, Sampling, bucket, left_pad
from jaxlm.model import Decoder, ModelConfig
from jaxlm.model.retrieval import datastore_bytes, make_datastore, shard_datastore

ENCODE_TOKENS = 8192  # window tokens per encoder call (windows per call = ENCODE_TOKENS // C, at least 1)
STORE_STEP = 4096  # datastores above this many entries grow in steps of it (below: powers of two)


@dataclasses.dataclass(frozen=True)
class Window:
    read: int  # first token the window reads (its left context starts here)
    keep: int  # first token it keeps (encoded for the first time)
    end: int  # one past its last token


def chunk_windows(n: int, context: int, overlap: int) -> list[Window]:
    """The prefill windows of an n-token input; their [keep, end) ranges tile [0, n) exactly once."""
    if not 0 <= overlap < context:
        raise ConfigError(f"overlap {overlap} must be in [0, context={context})")
    out, keep = [], 0
    while keep < n:
        read = max(0, keep - overlap)
        end = min(n, read + context)
        out.append(Window(read, keep, end))
        keep = end
    return out


def default_span(n: int, window: int) -> tuple[int, int]:
    """Everything but the last min(window, n) tokens is searchable."""
    return 0, n - min(window, n)


def position_plan(n: int, span: tuple[int, int], max_new_tokens: int, context: int):
    """(pos [n] int32 of every input token, position of the first suffix token, exact?) - rule 3."""
    a, b = span
    m = b - a
    local = n - m
    if n + max_new_tokens <= context:
        return np.arange(n, dtype=np.int32), b, True
    p = context - local - max_new_tokens
    if p < 1:
        raise ConfigError(f"{local} local tokens (outside the long input) + max_new_tokens {max_new_tokens} must be "
                          f"below the context {context}: no positions are left for the retrieved entries",
                          hint="shorten the question or the generation, or lower model.attention.retrieval.window")
    pos = np.empty(n, np.int32)
    pos[:a] = np.arange(a)
    pos[a:b] = a + (np.arange(m, dtype=np.int64) * p) // max(m, 1)
    pos[b:] = a + p + np.arange(n - b)
    return pos, a + p, False


def store_size(n: int, top_k: int, multiple: int = 1) -> int:
    """Datastore rows for n tokens: a power of two >= 256 up to STORE_STEP, then multiples of it."""
    m = max(n, top_k)
    size = bucket(m, 256) if m <= STORE_STEP else -(-m // STORE_STEP) * STORE_STEP
    return -(-size // multiple) * multiple


def as_retrieval(config: ModelConfig) -> ModelConfig:
    """The same model with the retrieval attention core (same params: without a datastore it is dense)."""
    if config.attention.impl == "retrieval":
        return config
    return config.replace(attention=dataclasses.replace(config.attention, impl="retrieval"))


def chat_input(tok, text: str, question: str = "", system: str | None = None, sep: str = "\n\n"):
    """(ids, span) of one chat turn that reads a long input: the user turn holds `text`, then `sep` and
    the question, in the tokenizer's chat template with a generation prompt; span = (a, b) are the
    text's tokens in ids (ChatML: <|im_start|>user\\n[text]\\n\\n{question}<|im_end|>\\n<|im_start|>assistant\\n).
    The text is tokenized on its own, special-token strings in it as plain text."""
    from jaxlm.data.tokenizer import apply_chat_template

    marker = "\ue000\ue001\ue002"  # private-use characters: one pre-token, nothing merges across it
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": marker + (sep + question if question else "")}]
    ids, _ = apply_chat_template(tok, messages, add_generation_prompt=True)
    mark = tok.encode(marker, special=False)
    at = next((i for i in range(len(ids) - len(mark) + 1) if ids[i:i + len(mark)] == mark), -1)
    if at < 0:
        raise TokenizerError("cannot place a long input in this chat template (it rewrites the user message)")
    body = tok.encode(text, special=False)
    return ids[:at] + body + ids[at + len(mark):], (at, at + len(body))


@dataclasses.dataclass
class LongGeneration(Generation):
    datastore_seconds: float = 0.0  # chunked prefill (included in prefill_seconds)
    datastore_bytes: int = 0
    datastore_entries: int = 0  # searchable entries (the span)
    windows: int = 0  # prefill windows encoded
    exact_positions: bool = True


class LongGenerator(Generator):
    """Jitted datastore encoder, local prefill and decode loop for one config and sampling setting."""

    def __init__(self, config: ModelConfig, sampling: Sampling = Sampling(), cache_dtype=None,
                 encode_batch: int = 0):
        config = as_retrieval(config)
        super().__init__(config, sampling, cache_dtype)
        r = config.attention.retrieval
        self.context = r.context or config.max_position_embeddings
        if config.rope_scaling == "longrope" and self.context > config.original_max_position_embeddings:
            raise ConfigError("model.attention.retrieval.context must be <= original_max_position_embeddings for "
                              "LongRoPE models (one set of factors for the datastore and the window)")
        self.layers = r.retrieval_layers(config.num_layers)
        self.encode_batch = encode_batch or max(1, ENCODE_TOKENS // self.context)
        self.encoder = Decoder(config, collect=True)
        self.encode = jax.jit(self._encode_impl, donate_argnums=1)
        self.window = jax.jit(self._window_impl, static_argnames=("last",))

    # -- pure pieces -------------------------------------------------------------------------
    def _encode_impl(self, params, store, tokens, seg, dest):
        """Encode windows tokens [G, C] (seg 0 = right padding) and write each window token's attention
        inputs to store [L_ret, 1, S, d] at row dest [G*C] (rows >= S: not kept, dropped)."""
        g, c = tokens.shape
        pos = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32)[None], (g, c))
        _, collected = self.encoder.apply({"params": params}, tokens, pos, seg, return_hidden=True, retrieval={})
        x = collected[jnp.asarray(self.layers)].reshape(len(self.layers), g * c, -1)
        return store.at[:, 0, dest].set(x.astype(store.dtype), mode="drop")

    def _window_impl(self, pr, tokens, seg, pos, cache, last=0):
        """(logits of all tokens, or of the last `last` only: an 8K prefill's [T, V] logits are GBs), cache."""
        params, rctx = pr
        out, cache = self.model.apply({"params": params}, tokens, pos, seg, cache=cache, retrieval=rctx,
                                      return_hidden=bool(last))
        if last:
            out = self.model.apply({"params": params}, out[:, -last:], method=Decoder.logits)
        return out, cache

    def _step_impl(self, pr, cache, tokens, positions, adapter_ids=None):
        """Generator's decode step with (params, datastore) as the parameters."""
        params, rctx = pr
        seg = jnp.ones((tokens.shape[0], 1), jnp.int32)
        logits, cache = self.model.apply({"params": params}, tokens[:, None], positions[:, None], seg, cache=cache,
                                         retrieval=rctx)
        return logits[:, 0], cache

    # -- the impure driver --------------------------------------------------------------------
    def _span(self, n: int, span) -> tuple[int, int]:
        if not n:
            raise ConfigError("retrieval needs a non-empty input")
        a, b = default_span(n, self.config.attention.retrieval.window) if span is None else map(int, span)
        if not 0 <= a <= b < n:
            raise ConfigError(f"span ({a}, {b}) must lie in [0, {n}) and leave at least the last token local")
        return a, b

    def datastore(self, params, ids: Sequence[int], max_new_tokens: int, span=None, mesh=None, axis="data"):
        """(rctx, info) for one input: the chunked prefill of [0, b) (rule 1) with positions by rule 3."""
        c, r = self.config, self.config.attention.retrieval
        n = len(ids)
        a, b = self._span(n, span)
        wins = chunk_windows(b, self.context, r.overlap)
        pos, start, exact = position_plan(n, (a, b), max_new_tokens, self.context)
        size = store_size(b, r.top_k, mesh.size if mesh is not None else 1)
        dt = self.cache_dtype or jnp.dtype(c.dtype)
        need = len(self.layers) * size * c.hidden_size * jnp.dtype(dt).itemsize
        if need > r.max_datastore_mib * 2**20:
            raise ConfigError(f"an input of {n} tokens needs a {need / 2**20:.0f} MiB datastore, more than "
                              f"model.attention.retrieval.max_datastore_mib={r.max_datastore_mib:g}",
                              hint="raise --config.model.attention.retrieval.max_datastore_mib, retrieve in fewer "
                                   "layers (retrieval.layers), or shorten the input")
        store = jnp.zeros((len(self.layers), 1, size, c.hidden_size), dt)
        ids = np.asarray(ids, np.int32)
        ctx = self.context
        i = 0
        while i < len(wins):  # full calls of encode_batch windows, the rest in a power-of-two call
            g = min(self.encode_batch, bucket(len(wins) - i, 1))
            width = min(ctx, bucket(max(w.end - w.read for w in wins[i:i + g]), 256))  # a short last window
            tokens = np.full((g, width), c.pad_token_id, np.int32)
            seg = np.zeros((g, width), np.int32)
            dest = np.full((g, width), size, np.int32)  # out of range: dropped
            for j, w in enumerate(wins[i:i + g]):
                tokens[j, : w.end - w.read] = ids[w.read:w.end]
                seg[j, : w.end - w.read] = 1
                dest[j, w.keep - w.read: w.end - w.read] = np.arange(w.keep, w.end)
            store = self.encode(params, store, tokens, seg, dest.reshape(-1))
            i += g
        valid = np.zeros((1, size), bool)
        valid[0, a:b] = True
        p = np.zeros((1, size), np.int32)
        p[0, :b] = pos[:b]
        rctx = make_datastore(c, store, valid, p)
        if mesh is not None:
            rctx = shard_datastore(rctx, mesh, axis)
        return rctx, {"windows": len(wins), "span": (a, b), "pos": pos, "start": start, "exact": exact}

    def extend(self, pr, cache, ids: Sequence[int], positions, length: int, last: int = 0):
        """Append ids (left-padded to `length` slots) at their positions to the local cache with the
        parameters pr = (params, datastore or {}): (logits [len(ids), V] - or of the last `last` ids only -,
        cache, the padded tokens [1, length])."""
        tokens, seg, _ = left_pad([list(ids)], length, self.config.pad_token_id)
        pos = np.zeros_like(tokens)
        pos[0, length - len(ids):] = np.asarray(positions)
        logits, cache = self.window(pr, tokens, seg, pos, cache, last=min(last, len(ids)))
        return logits[0, -(min(last, len(ids)) or len(ids)):], cache, tokens

    def finish(self, pr, cache, last_logits, next_pos: int, history, *, max_new_tokens: int,
               stop_tokens: Sequence[int] = (), seed: int = 0):
        """Sample up to max_new_tokens from the local cache: (tokens, finished); history [1, cache slots
        before the generated ones]."""
        pad = self.config.pad_token_id
        stops = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
        history = np.concatenate([history, np.full((1, max_new_tokens), pad, np.int32)], axis=1)
        out, done, steps = self.loop(pr, cache, last_logits[None], jnp.asarray([next_pos], jnp.int32),
                                     jax.random.key(seed), stops, jnp.int32(pad), history,
                                     max_new_tokens=max_new_tokens)
        out, done = np.asarray(out), np.asarray(done)
        stop_set = set(int(s) for s in stop_tokens)
        row = []
        for t in out[0, : int(steps)].tolist():
            row.append(t)
            if t in stop_set:
                break
        return row, bool(done[0])

    def _local(self, params, rctx, ids, info, max_new_tokens):
        """Prefill the prefix (local attention) and the suffix (retrieval): (suffix logits, cache,
        history, next position)."""
        a, b = info["span"]
        n, pos = len(ids), info["pos"]
        pre = bucket(a, 16) if a else 0
        suf = bucket(n - b, 16)
        cache = self.new_cache(1, pre + suf + max_new_tokens)
        parts = []
        if a:
            _, cache, t = self.extend((params, {}), cache, ids[:a], pos[:a], pre, last=1)
            parts.append(t)
        logits, cache, t = self.extend((params, rctx), cache, ids[b:], pos[b:], suf)
        return logits, cache, np.concatenate(parts + [t], axis=1), int(pos[-1]) + 1

    def prompt_logits(self, params, ids: Sequence[int], max_new_tokens: int = 1, span=None, mesh=None):
        """Logits [n - b, V] of the local suffix under retrieval attention."""
        rctx, info = self.datastore(params, ids, max_new_tokens, span, mesh)
        return self._local(params, rctx, ids, info, max_new_tokens)[0]

    def generate(self, params, ids: Sequence[int], *, max_new_tokens: int, stop_tokens: Sequence[int] = (),
                 seed: int = 0, span=None, mesh=None, axis="data", datastore=None) -> LongGeneration:
        """Sample up to max_new_tokens after one long input `ids` (any length); span: the searchable
        tokens (rule 0). datastore: a prebuilt (rctx, info) of these ids, span and max_new_tokens."""
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        rctx, info = datastore or self.datastore(params, ids, max_new_tokens, span, mesh, axis)
        jax.block_until_ready(rctx)
        t1 = time.perf_counter()
        logits, cache, history, next_pos = self._local(params, rctx, ids, info, max_new_tokens)
        logits.block_until_ready()
        t2 = time.perf_counter()
        row, done = self.finish((params, rctx), cache, logits[-1], next_pos, history, max_new_tokens=max_new_tokens,
                                stop_tokens=stop_tokens, seed=seed)
        t3 = time.perf_counter()
        a, b = info["span"]
        return LongGeneration(tokens=[row], finished=[done], prefill_seconds=t2 - t0, decode_seconds=t3 - t2,
                              prompt_tokens=len(ids), generated_tokens=len(row), datastore_seconds=t1 - t0,
                              datastore_bytes=datastore_bytes(rctx), datastore_entries=b - a, windows=info["windows"],
                              exact_positions=info["exact"])

    def generate_dense(self, params, ids: Sequence[int], *, max_new_tokens: int, stop_tokens: Sequence[int] = (),
                       seed: int = 0) -> Generation:
        """The baseline on the same machinery: plain causal attention over all of ids at positions
        0..n-1 (positions past the trained context are the caller's choice), prefilled in query blocks."""
        if not len(ids) or max_new_tokens < 1:
            raise ConfigError("generate_dense needs a non-empty input and max_new_tokens >= 1")
        t0 = time.perf_counter()
        length = bucket(len(ids), 16)
        cache = self.new_cache(1, length + max_new_tokens)
        logits, cache, history = self.extend((params, {}), cache, ids, np.arange(len(ids)), length, last=1)
        logits.block_until_ready()
        t1 = time.perf_counter()
        row, done = self.finish((params, {}), cache, logits[-1], len(ids), history, max_new_tokens=max_new_tokens,
                                stop_tokens=stop_tokens, seed=seed)
        return Generation(tokens=[row], finished=[done], prefill_seconds=t1 - t0,
                          decode_seconds=time.perf_counter() - t1, prompt_tokens=len(ids), generated_tokens=len(row))


def read_long_input(path) -> str:
    """The text of a long-input file; a missing, empty or binary file is an error naming it."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"cannot read long input {path}: {e.strerror or e}") from None
    if b"\0" in data[:1 << 16]:
        raise DataError(f"long input {path} is a binary file, not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"long input {path} is not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"long input {path} is empty")
    return text


_GENERATORS: dict = {}


def long_generator(config: ModelConfig, sampling: Sampling = Sampling()) -> LongGenerator:
    """A LongGenerator per (config, sampling), kept so that repeated calls reuse its compilations."""
    key = (config, sampling)
    if key not in _GENERATORS:
        if len(_GENERATORS) >= 8:
            _GENERATORS.pop(next(iter(_GENERATORS)))
        _GENERATORS[key] = LongGenerator(config, sampling)
    return _GENERATORS[key]


def generate_long(config: ModelConfig, params, prompt_ids: Sequence[int], *, max_new_tokens: int,
                  stop_tokens: Sequence[int] = (), temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                  seed: int = 0, span=None, mesh=None) -> LongGeneration:
    """Continue one input of any length with retrieval attention (settings: config.attention.retrieval);
    span: the searchable tokens (default: all but the last `window`; `chat_input` gives a chat turn's)."""
    gen = long_generator(config, Sampling(temperature, top_k, top_p))
    return gen.generate(params, prompt_ids, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens, seed=seed,
                        span=span, mesh=mesh)
