"""Continuous batching: a fixed number of decode slots over one KV cache with a write position per row.

A request is prefilled alone (its prompt right-padded to a power-of-two bucket, so there is one
compilation per bucket), then each of its `n` choices is copied into a free slot (`insert_row`) and
joins the running batch at the next step boundary; a finished or cancelled choice frees its slot at
once. Every slot carries its own sampling settings (temperature, top-k, top-p, seed) as per-row
arrays of the one jitted decode step (`sample_rows`), so a batch never shares one setting.

A choice's random draws depend only on its seed, its choice index and its own step count
(key = fold_in(fold_in(key(seed), choice), step)), and a row's logits only on that row's tokens
(up to float rounding between the compiled batch shapes), so a request gets the same tokens alone or
among others.

The decode step runs only the first `rows` slots (new requests take the lowest free slot) and attends
only their first `kv_len` cache slots (the longest live row), both rounded up to powers of two: one
compilation per (rows, length) bucket, and a lightly loaded server does not pay for its idle slots.

The engine runs in one thread; `submit` and `cancel` may be called from any thread, and events
(`Token`, `PromptLogprobs`, `Finish`) are handed to the request's `sink(choice, event)` from the
engine thread. Static batching (admit only into an empty batch, optionally waiting for a full one)
and sequential serving (one slot) are the same engine with other settings: the baselines of
bench/serve_load.py.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError
from jaxlm.infer.generate import Sampling, bucket, sample_rows
from jaxlm.model import Decoder, ModelConfig, init_cache
from jaxlm.model.cache import insert_row
from jaxlm.model.s2 import cache_config, compressed

log = logging.getLogger("jaxlm.engine")

TOP_LOGPROBS = 20  # OpenAI's cap on top_logprobs; computed for every row at every step


@dataclasses.dataclass
class Token:
    id: int
    logprob: float  # log-softmax of the model's raw logits (before temperature / truncation)
    top: list[tuple[int, float]]  # the request's top_logprobs most likely (id, logprob), best first


@dataclasses.dataclass
class PromptLogprobs:
    """The prompt's own tokens scored (echo): logprobs[0] and top[0] are None (nothing precedes)."""
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclasses.dataclass
class Finish:
    reason: str  # "stop" (a stop token) | "length" | "cancelled" | "error"
    message: str = ""


@dataclasses.dataclass(eq=False)
class Request:
    """One prompt and its `n` choices. sink(choice, event) receives the events (engine thread)."""
    prompt: Sequence[int]
    max_tokens: int
    sink: Callable[[int, object], None]
    sampling: Sampling = Sampling()
    seed: int = 0
    n: int = 1
    stop_ids: Sequence[int] = ()
    top_logprobs: int = 0  # how many alternatives each Token carries
    echo_logprobs: int | None = None  # score the prompt too (PromptLogprobs with this many alternatives)
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    # engine-side state
    cancelled: set = dataclasses.field(default_factory=set)  # choices (or -1 for all)
    _admitted: int = 0
    _prefill: tuple | None = None


@dataclasses.dataclass
class _Slot:
    req: Request
    choice: int
    generated: int  # tokens produced so far


class Engine:
    """Continuously batched decoding for one model. `start()` it, `submit` requests, `close()` it."""

    def __init__(self, config: ModelConfig, params, *, slots: int = 8, max_len: int = 1024, pad_id: int = 0,
                 static: bool = False, static_wait: float = 0.0, max_queue: int = 256, min_bucket: int = 16,
                 cache_dtype=None):
        if slots < 1:
            raise ConfigError(f"slots must be >= 1, got {slots}")
        if config.rope_scaling == "longrope" and max_len > config.original_max_position_embeddings:
            # rows at different lengths share one rope call, and LongRoPE's long factors are chosen per
            # call: stay below the switch so every row keeps the factors it would have alone
            log.warning("LongRoPE model: serving context capped at original_max_position_embeddings=%d",
                        config.original_max_position_embeddings)
            max_len = config.original_max_position_embeddings
        self.config = cache_config(config, max_len)
        self.params, self.slots, self.max_len, self.pad_id = params, slots, max_len, pad_id
        self.static, self.static_wait, self.max_queue, self.min_bucket = static, static_wait, max_queue, min_bucket
        self.active = slots  # slots that take requests (fewer: sequential serving with active=1, a baseline)
        self.cache_dtype = cache_dtype
        self.model = Decoder(self.config)
        self.compressed = compressed(self.config)
        self.cache = init_cache(self.config, slots, max_len, cache_dtype, per_row=True)
        self._prefill_fn = jax.jit(self._prefill_impl, static_argnames=("echo",))
        self._admit_fn = jax.jit(self._admit_impl, donate_argnums=0)
        self._decode_fn = jax.jit(self._decode_impl, donate_argnums=1, static_argnames=("rows", "kv_len"))
        # per-slot host state, handed to every decode step
        self.tokens = np.zeros(slots, np.int32)
        self.positions = np.zeros(slots, np.int32)
        self.seeds = np.zeros(slots, np.uint32)
        self.streams = np.zeros(slots, np.int32)
        self.steps = np.zeros(slots, np.int32)
        self.temperature = np.zeros(slots, np.float32)
        self.top_k = np.zeros(slots, np.int32)
        self.top_p = np.ones(slots, np.float32)
        self.live: list[_Slot | None] = [None] * slots
        self._pending: collections.deque[Request] = collections.deque()
        self._cv = threading.Condition()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "max_live": 0}

    # -- pure, jitted ----------------------------------------------------------------------------
    def _prefill_impl(self, params, tokens, length, *, echo: bool):
        """tokens [1, P] (right-padded), real length -> (one-row cache, last logits [V], echo scores)."""
        p = tokens.shape[1]
        seg = (jnp.arange(p) < length).astype(jnp.int32)[None]
        pos = jnp.arange(p, dtype=jnp.int32)[None]
        row = init_cache(self.config, 1, self.max_len if self.compressed else p, self.cache_dtype)
        hidden, row = self.model.apply({"params": params}, tokens, pos, seg, cache=row, return_hidden=True)
        last = jax.lax.dynamic_index_in_dim(hidden[0], length - 1, keepdims=False)
        logits = self.model.apply({"params": params}, last, method=Decoder.logits)
        if not echo:
            return row, logits, None
        lp = jax.nn.log_softmax(self.model.apply({"params": params}, hidden[0], method=Decoder.logits), axis=-1)
        tok_lp = jnp.take_along_axis(lp[:-1], tokens[0, 1:, None], axis=-1)[:, 0]  # P(t+1 | ..t)
        top_lp, top_ids = jax.lax.top_k(lp[:-1], TOP_LOGPROBS)
        return row, logits, (tok_lp, top_ids, top_lp)

    @staticmethod
    def _keys(seeds, streams, steps):
        return jax.vmap(lambda s, c, t: jax.random.fold_in(jax.random.fold_in(jax.random.key(s), c), t))(
            seeds, streams, steps)

    @staticmethod
    def _pick(logits, keys, temperature, top_k, top_p):
        tok = sample_rows(logits, keys, temperature, top_k, top_p)
        lp = jax.nn.log_softmax(logits, axis=-1)
        tok_lp = jnp.take_along_axis(lp, tok[:, None], axis=-1)[:, 0]
        top_lp, top_ids = jax.lax.top_k(lp, TOP_LOGPROBS)
        return tok, tok_lp, top_ids, top_lp

    def _admit_impl(self, cache, row, logits, slot, length, seed, stream, temperature, top_k, top_p):
        """Copy a prefilled row into `slot` and draw the choice's first token."""
        cache = insert_row(cache, row, slot, length)
        keys = self._keys(seed[None], stream[None], jnp.zeros((1,), jnp.int32))
        return (cache,) + self._pick(logits[None], keys, temperature[None], top_k[None], top_p[None])

    def _decode_impl(self, params, cache, tokens, positions, seeds, streams, steps, temperature, top_k, top_p,
                     *, rows: int, kv_len: int):
        """One step of the first `rows` slots, attending their first `kv_len` cache slots:
        tokens [rows] at positions [rows] -> (cache, next tokens and logprobs of those rows)."""
        seg = jnp.ones((rows, 1), jnp.int32)
        sub = {}
        for name, x in cache.items():
            if name == "index":
                continue
            b = 0 if name == "segment_ids" else 1  # the batch axis; the length axis follows it
            x = jax.lax.slice_in_dim(x, 0, rows, axis=b)
            if name in ("k", "v", "segment_ids") and kv_len < x.shape[b + 1]:
                x = jax.lax.slice_in_dim(x, 0, kv_len, axis=b + 1)
            sub[name] = x
        sub["index"] = positions
        logits, sub = self.model.apply({"params": params}, tokens[:, None], positions[:, None], seg, cache=sub)
        new = {name: jax.lax.dynamic_update_slice(x, sub[name].astype(x.dtype), (0,) * x.ndim)
               for name, x in cache.items() if name != "index"}
        new["index"] = jax.lax.dynamic_update_slice(cache["index"], sub["index"], (0,))
        keys = self._keys(seeds, streams, steps)
        return (new,) + self._pick(logits[:, 0], keys, temperature, top_k, top_p)

    def warmup(self, max_prompt: int, max_total: int | None = None):
        """Compile, before serving, the prefill of every prompt bucket up to max_prompt tokens and the
        decode step of every (rows, length) bucket up to max_total (default: the context)."""
        if self._thread is not None:
            raise RuntimeError("warm the engine up before start()")
        max_total = min(max_total or self.max_len, self.max_len)
        p = self.min_bucket
        z32 = np.int32(0)
        while True:  # prefill (with and without echo) and admission, per prompt bucket
            p = min(p, self.max_len)
            self._prefill_fn(self.params, np.zeros((1, p), np.int32), np.int32(1), echo=True)
            row, logits, _ = self._prefill_fn(self.params, np.zeros((1, p), np.int32), np.int32(1), echo=False)
            self.cache = self._admit_fn(self.cache, row, logits, z32, np.int32(1), np.uint32(0), z32, np.float32(0),
                                        z32, np.float32(1))[0]
            if p >= min(bucket(max_prompt, self.min_bucket), self.max_len):
                break
            p *= 2
        rows = 1
        while True:
            kv = 32 if not self.compressed else self.max_len
            while True:
                kv = min(kv, self.max_len)
                r = slice(0, rows)
                self.cache = self._decode_fn(self.params, self.cache, self.tokens[r], self.positions[r], self.seeds[r],
                                             self.streams[r], self.steps[r], self.temperature[r], self.top_k[r],
                                             self.top_p[r], rows=rows, kv_len=kv)[0]
                if kv >= min(bucket(max_total, 32), self.max_len):
                    break
                kv *= 2
            if rows >= self.slots:
                break
            rows = min(rows * 2, self.slots)
        jax.block_until_ready(self.cache)
        self.cache = init_cache(self.config, self.slots, self.max_len, self.cache_dtype, per_row=True)

    # -- the thread ------------------------------------------------------------------------------
    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="jaxlm-engine", daemon=True)
            self._thread.start()
        return self

    def close(self):
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def submit(self, req: Request) -> bool:
        """Queue a request; False when the queue is full (the caller answers 429)."""
        if len(req.prompt) < 1 or len(req.prompt) > self.max_len:
            raise ConfigError(f"prompt of {len(req.prompt)} tokens; the engine takes 1..{self.max_len}")
        if len(req.prompt) + req.max_tokens > self.max_len:
            raise ConfigError(f"prompt ({len(req.prompt)}) + max_tokens ({req.max_tokens}) exceeds the "
                              f"context of {self.max_len} tokens")
        with self._cv:
            if len(self._pending) >= self.max_queue:
                return False
            self._pending.append(req)
            self._cv.notify_all()
        return True

    def cancel(self, req: Request, choice: int = -1):
        """Stop a request (all choices, or one): its slots are freed at the next step boundary."""
        with self._cv:
            req.cancelled.add(choice)
            self._cv.notify_all()

    @property
    def busy(self) -> int:
        return sum(s is not None for s in self.live)

    @property
    def queued(self) -> int:
        return len(self._pending)

    def _run(self):
        while True:
            with self._cv:
                while not self._stop and not self._pending and not self.busy:
                    self._cv.wait()
                if self._stop:
                    break
            try:
                self._drop_cancelled()
                self._admit_pending()
                if self.busy:
                    self._step()
            except Exception as e:  # noqa: BLE001 - a bug must not hang every client: fail them and go on
                log.exception("engine step failed")
                self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("server shutting down", reason="cancelled")

    def _fail_all(self, message, reason="error"):
        for i, s in enumerate(self.live):
            if s is not None:
                self._send(s.req, s.choice, Finish(reason, message))
                self.live[i] = None
        with self._cv:
            pending, self._pending = list(self._pending), collections.deque()
        for req in pending:
            for c in range(req._admitted, req.n):
                self._send(req, c, Finish(reason, message))
        self.cache = init_cache(self.config, self.slots, self.max_len, self.cache_dtype, per_row=True)

    @staticmethod
    def _send(req, choice, event):
        try:
            req.sink(choice, event)
        except Exception:  # noqa: BLE001 - a receiver that is gone (closed loop) must not stop the engine
            log.warning("request receiver failed; cancelling it", exc_info=True)
            req.cancelled.add(-1)

    def _is_cancelled(self, req, choice):
        return -1 in req.cancelled or choice in req.cancelled

    def _drop_cancelled(self):
        for i, s in enumerate(self.live):
            if s is not None and self._is_cancelled(s.req, s.choice):
                self._free(i, Finish("cancelled"))
        with self._cv:
            keep = collections.deque()
            for req in self._pending:
                if -1 in req.cancelled:
                    for c in range(req._admitted, req.n):
                        self._send(req, c, Finish("cancelled"))
                else:
                    keep.append(req)
            self._pending = keep

    def _free(self, i, finish):
        s = self.live[i]
        self.live[i] = None
        self.temperature[i], self.top_k[i], self.top_p[i] = 0.0, 0, 1.0
        self.tokens[i] = self.positions[i] = self.steps[i] = 0
        self._send(s.req, s.choice, finish)

    def _admit_pending(self):
        if self.static:
            if self.busy:
                return
            if self.static_wait > 0:  # wait (a bounded time) for a full batch
                with self._cv:
                    deadline = (self._pending[0].submitted if self._pending else time.perf_counter()) + self.static_wait
                    while (not self._stop and sum(r.n - r._admitted for r in self._pending) < self.active
                           and time.perf_counter() < deadline):
                        self._cv.wait(max(deadline - time.perf_counter(), 0.001))
        while True:
            with self._cv:
                if not self._pending:
                    return
                req = self._pending[0]
            free = [i for i in range(self.active) if self.live[i] is None]
            if req._prefill is None:
                if not free and req.max_tokens > 0:
                    return
                self._prefill(req)
            while req._admitted < req.n and req.max_tokens > 0 and -1 not in req.cancelled:
                if not free:
                    return
                self._admit(req, free.pop(0))
            for c in range(req._admitted, req.n):  # cancelled before they had a slot
                self._send(req, c, Finish("cancelled"))
            req._admitted = req.n
            with self._cv:
                if self._pending and self._pending[0] is req:
                    self._pending.popleft()
            req._prefill = None

    def _prefill(self, req):
        n = len(req.prompt)
        p = min(bucket(n, self.min_bucket), self.max_len)
        tokens = np.full((1, p), self.pad_id, np.int32)
        tokens[0, :n] = req.prompt
        echo = req.echo_logprobs is not None
        row, logits, scores = self._prefill_fn(self.params, tokens, np.int32(n), echo=echo)
        self.stats["prefills"] += 1
        req._prefill = (row, logits)
        if echo:
            tok_lp, top_ids, top_lp = (np.asarray(a) for a in scores)
            k = req.echo_logprobs
            top = [None] + [list(zip(top_ids[t, :k].tolist(), top_lp[t, :k].tolist())) for t in range(n - 1)]
            self._send(req, -1, PromptLogprobs([None] + tok_lp[: n - 1].tolist(), top))
        if req.max_tokens == 0:
            for c in range(req.n):
                self._send(req, c, Finish("length"))
            req._admitted = req.n

    def _admit(self, req, i):
        choice = req._admitted
        if self._is_cancelled(req, choice):
            req._admitted += 1
            self._send(req, choice, Finish("cancelled"))
            return
        row, logits = req._prefill
        s = req.sampling
        self.seeds[i], self.streams[i], self.steps[i] = req.seed % 2**32, choice, 1
        self.temperature[i], self.top_k[i], self.top_p[i] = s.temperature, s.top_k, s.top_p
        out = self._admit_fn(self.cache, row, logits, np.int32(i), np.int32(len(req.prompt)), self.seeds[i],
                             np.int32(choice), self.temperature[i], self.top_k[i], self.top_p[i])
        req._admitted += 1  # only now: a failure above leaves the choice pending, and _fail_all finishes it
        self.cache = out[0]
        tok, tok_lp, top_ids, top_lp = (np.asarray(a) for a in out[1:])
        self.live[i] = _Slot(req, choice, 0)
        self.positions[i] = len(req.prompt)
        self._emit(i, int(tok[0]), float(tok_lp[0]), top_ids[0], top_lp[0])

    def _emit(self, i, tok, lp, top_ids, top_lp):
        s = self.live[i]
        k = s.req.top_logprobs
        self._send(s.req, s.choice, Token(tok, lp, list(zip(top_ids[:k].tolist(), top_lp[:k].tolist())) if k else []))
        s.generated += 1
        self.stats["tokens"] += 1
        if tok in s.req.stop_ids:
            self._free(i, Finish("stop"))
        elif s.generated >= s.req.max_tokens or self.positions[i] >= self.max_len:  # no slot for it
            self._free(i, Finish("length"))
        else:
            self.tokens[i] = tok

    def _step(self):
        live = [i for i, s in enumerate(self.live) if s is not None]
        self.stats["max_live"] = max(self.stats["max_live"], len(live))
        # new requests take the lowest free slots, so the live ones mostly sit in a short prefix
        rows = min(bucket(live[-1] + 1, 1), self.slots)
        longest = int(self.positions[live].max()) + 1
        kv_len = self.max_len if self.compressed else min(bucket(longest, 32), self.max_len)
        r = slice(0, rows)
        out = self._decode_fn(self.params, self.cache, self.tokens[r], self.positions[r], self.seeds[r],
                              self.streams[r], self.steps[r], self.temperature[r], self.top_k[r], self.top_p[r],
                              rows=rows, kv_len=kv_len)
        self.cache = out[0]
        tok, tok_lp, top_ids, top_lp = (np.asarray(a) for a in out[1:])
        self.stats["steps"] += 1
        for i in live:
            self.positions[i] += 1
            self.steps[i] += 1
            self._emit(i, int(tok[i]), float(tok_lp[i]), top_ids[i], top_lp[i])

    # -- a blocking convenience (tests, benchmarks) -------------------------------------------------
    def complete(self, prompt, *, max_tokens, timeout: float | None = None, **kw) -> list[tuple[list[int], str]]:
        """Submit one request and wait: [(tokens, finish reason)] per choice."""
        done = threading.Event()
        n = kw.get("n", 1)
        toks: list[list[int]] = [[] for _ in range(n)]
        reasons: list[str | None] = [None] * n

        def sink(choice, ev):
            if isinstance(ev, Token):
                toks[choice].append(ev.id)
            elif isinstance(ev, Finish):
                reasons[choice] = ev.reason
                if all(r is not None for r in reasons):
                    done.set()

        req = Request(list(prompt), max_tokens, sink, **kw)
        if not self.submit(req):
            raise RuntimeError("engine queue is full")
        if not done.wait(timeout):
            self.cancel(req)
            raise TimeoutError("request did not finish in time")
        return list(zip(toks, reasons))
