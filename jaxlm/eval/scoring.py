"""Log-likelihoods of continuations, scored as lm-evaluation-harness's HF model scores them, faster.

Tokenisation is the harness's (`encode_pair`): trailing whitespace of the context moves into the
continuation, the whole string is encoded, and the continuation is what follows the context's own
encoding. The model reads context + continuation (left-truncated to max_length + 1 tokens); a
continuation's log-likelihood is the sum of its tokens' log-probabilities, and it is greedy when
each of its tokens is the argmax.

What is faster than the harness's one padded row per (context, continuation):

* each question's context is computed once for all its choices. A call prefills packed rows of
  contexts (several questions per row, one segment id each, positions restarting per segment) into
  a KV cache; each cache row is repeated K times (K = most choices of a question) and row j of the K
  holds choice j of every question of that cache row, each in its question's segment, so it attends
  its own context and itself only;
* a context's last token is fed again at the head of each of its continuations (and left out of the
  prefill), so the hidden state that predicts every scored token comes out of the continuation
  call; the vocabulary projection runs on those rows only, in chunks;
* rows are packed (first fit, longest first; a question's choices spread over its K rows, longest
  to the emptiest) instead of padded, and every call of a task has the same shape: one
  compilation per task (the last call is padded to the same shape).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data.tokenizer import HFTokenizer, Tokenizer
from jaxlm.errors import DataError
from jaxlm.model import Decoder, ModelConfig, init_cache


def make_encoder(tok: Tokenizer) -> Callable[[str], list[int]]:
    """str -> ids as the harness's HF model encodes (`tokenizer.encode(s)`): a Hugging Face
    tokenizer's post-processor applies (a BOS where the tokenizer adds one)."""
    if isinstance(tok, HFTokenizer):
        return lambda s: tok.tok.encode(s).ids
    return lambda s: tok.encode(s)


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids), split as lm-evaluation-harness's `_encode_pair` splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx):]


def pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


@dataclasses.dataclass
class ScoreStats:
    """What the scorer did: requests, calls, tokens run (padding included) and real, shapes compiled."""

    requests: int = 0
    batches: int = 0
    tokens: int = 0
    real_tokens: int = 0
    shapes: set = dataclasses.field(default_factory=set)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- the jitted core
def _token_scores(config: ModelConfig, params, h_NxD, targets_N, chunk: int):
    """(log p(target), target is the argmax) per row of hidden states, `chunk` rows at a time."""
    n = h_NxD.shape[0]
    chunk = min(chunk, n)
    pad = -n % chunk
    h = jnp.pad(h_NxD, ((0, pad), (0, 0))).reshape(-1, chunk, h_NxD.shape[1])
    t = jnp.pad(targets_N, (0, pad)).reshape(-1, chunk)
    model = Decoder(config)

    def one(xs):
        hh, tt = xs
        logits = model.apply({"params": params}, hh, method=Decoder.logits)  # [chunk, V] float32
        picked = jnp.take_along_axis(logits, tt[:, None], axis=-1)[:, 0]
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == tt

    lp, greedy = jax.lax.map(one, (h, t))
    return lp.reshape(-1)[:n], greedy.reshape(-1)[:n]


@functools.partial(jax.jit, static_argnums=(0, 9))
def score_packed(config: ModelConfig, params, ctx_BxP, ctx_seg, ctx_pos, cont_RxL, cont_seg, cont_pos, targets_RxL,
                 chunk: int = 512):
    """Log-probs [R, L] and greedy flags [R, L] of `targets` (the token after each position).

    ctx: B packed rows of contexts (segment ids 1, 2, ... per question, 0 on padding; positions per
    segment). cont: R = B * K rows; rows r*K .. r*K+K-1 read cache row r, each token in its question's
    segment (0 on padding), positions continuing its context's."""
    b, p = ctx_BxP.shape
    r, length = cont_RxL.shape
    model = Decoder(config)
    cache = init_cache(config, b, p + length)
    _, cache = model.apply({"params": params}, ctx_BxP, ctx_pos, ctx_seg, cache=cache, return_hidden=True)
    k = r // b
    cache = {name: x if name == "index" else jnp.repeat(x, k, axis=0 if name == "segment_ids" else 1)
             for name, x in cache.items()}
    h, _ = model.apply({"params": params}, cont_RxL, cont_pos, cont_seg, cache=cache, return_hidden=True)
    lp, greedy = _token_scores(config, params, h.reshape(r * length, -1), targets_RxL.reshape(-1), chunk)
    return lp.reshape(r, length), greedy.reshape(r, length)


# ----------------------------------------------------------------------------- packing
@dataclasses.dataclass
class _Unit:
    """One context and the continuations scored against it: `pre` is prefilled, each item is the
    context's last token followed by a continuation."""

    pre: list[int]
    items: list[list[int]]
    slots: list[tuple[int, int]]  # (request, continuation) of each item

    @property
    def longest(self) -> int:
        return max(map(len, self.items))


def _units(requests, max_length: int) -> list[_Unit]:
    units = []
    for i, (ctx, conts) in enumerate(requests):
        if not ctx:
            raise DataError(f"request {i}: empty context (the harness would score it after a BOS token)")
        whole = _Unit(list(ctx[:-1]), [], [])
        for j, cont in enumerate(conts):
            if not cont:
                raise DataError(f"request {i}, continuation {j}: no tokens after the context's")
            if len(cont) > max_length:
                raise DataError(f"request {i}, continuation {j}: {len(cont)} tokens, more than max_length {max_length}")
            if len(ctx) + len(cont) > max_length + 1:  # the harness left-truncates this pair alone
                cut = list(ctx[-(max_length + 1 - len(cont)):])
                units.append(_Unit(cut[:-1], [cut[-1:] + list(cont)], [(i, j)]))
            else:
                whole.items.append(ctx[-1:] + list(cont))
                whole.slots.append((i, j))
        if whole.items:
            units.append(whole)
    return units


@dataclasses.dataclass
class Plan:
    """One task's calls: B context rows of P tokens, K continuation rows of L tokens per context row;
    `rows` lists the units of each context row and, per unit, the continuation row of each item."""

    p: int
    length: int
    k: int
    b: int
    rows: list  # [[(_Unit, [continuation row of each item]), ...] per context row]
    aligned: bool = False  # one unit per row, its context ending at slot P (sliding-window models)


def _ceil(n: int, m: int = 16) -> int:
    return -(-n // m) * m


def _place(items, fill, length):
    """Continuation rows for a unit's items (longest item to the emptiest row, each row at most once),
    or None when they do not fit in `length`."""
    rows = sorted(range(len(fill)), key=lambda j: fill[j])
    order = sorted(range(len(items)), key=lambda i: -len(items[i]))
    out = [0] * len(items)
    for i, j in zip(order, rows):
        if fill[j] + len(items[i]) > length:
            return None
        out[i] = j
    return out


def plan(units: list[_Unit], batch_tokens: int, sliding_window: int = 0) -> Plan:
    """Pack units into context rows, first fit, longest context first: a row takes a unit while its
    contexts fit in P tokens and its items fit in the row's K continuation rows of L tokens. P is at
    least the longest context and 256 (several questions per row); L keeps the data's ratio of
    continuation to context tokens, so both fill about together. Every call has the same shape.

    A sliding window masks by slot distance, which packing would stretch: with one, each row holds
    one question, its context right-aligned so that slots and positions differ by a constant."""
    k = max(len(u.items) for u in units)
    if sliding_window:
        p = _ceil(max(1, max(len(u.pre) for u in units)))
        length = _ceil(max(u.longest for u in units))
        b = max(1, batch_tokens // max(p, k * length))
        rows = [[(u, list(range(len(u.items))))] for u in sorted(units, key=lambda u: (-len(u.pre), -u.longest))]
        return Plan(p, length, k, 1 << (b.bit_length() - 1), rows, aligned=True)
    p = max(_ceil(max(len(u.pre) for u in units)), 256)
    longest = max(u.longest for u in units)
    pre = sum(len(u.pre) for u in units)
    per_row = sum(len(x) for u in units for x in u.items) / k * (p / pre if pre else 1.0)
    length = _ceil(max(longest, int(1.1 * per_row)) if pre else max(longest, 64))
    rows, room, fills = [], [], []
    for u in sorted(units, key=lambda u: (-len(u.pre), -u.longest)):
        for n in range(len(rows)):
            if len(u.pre) <= room[n] and (where := _place(u.items, fills[n], length)) is not None:
                break
        else:
            rows.append([])
            room.append(p)
            fills.append([0] * k)
            n, where = len(rows) - 1, _place(u.items, [0] * k, length)
        rows[n].append((u, where))
        room[n] -= len(u.pre)
        for x, j in zip(u.items, where):
            fills[n][j] += len(x)
    b = max(1, batch_tokens // max(p, k * length))
    b = 1 << (b.bit_length() - 1)
    return Plan(p, length, k, b, rows)


def _arrays(pl: Plan, rows, b: int):
    """The call's arrays and where each item's scores are: (row, start, number of scored tokens, slot)."""
    p, length, k = pl.p, pl.length, pl.k
    ctx, ctx_seg, ctx_pos = (np.zeros((b, p), np.int32) for _ in range(3))
    cont, cont_seg, cont_pos, targets = (np.zeros((b * k, length), np.int32) for _ in range(4))
    where = []
    for r, units in enumerate(rows):
        at = 0
        fill = [0] * k
        for s, (u, place) in enumerate(units, start=1):
            n = len(u.pre)
            at = p - n if pl.aligned else at
            ctx[r, at:at + n] = u.pre
            ctx_seg[r, at:at + n] = s
            ctx_pos[r, at:at + n] = np.arange(n)
            at += n
            for item, j, slot in zip(u.items, place, u.slots):
                row, start, m = r * k + j, fill[j], len(item)
                cont[row, start:start + m] = item
                cont_seg[row, start:start + m] = s
                cont_pos[row, start:start + m] = n + np.arange(m)
                targets[row, start:start + m - 1] = item[1:]
                where.append((row, start, m - 1, slot))
                fill[j] += m
    return (ctx, ctx_seg, ctx_pos, cont, cont_seg, cont_pos, targets), where


def _config_for_scoring(config: ModelConfig) -> ModelConfig:
    """The full (uncompressed) KV cache: repeated per continuation row, read through a mask."""
    s2 = config.attention.s2
    if config.attention.impl == "s2" and s2.compressed_cache:
        config = config.replace(attention=dataclasses.replace(
            config.attention, s2=dataclasses.replace(s2, compressed_cache=False)))
    return config


def score_requests(config: ModelConfig, params, requests: Sequence[tuple[Sequence[int], Sequence[Sequence[int]]]],
                   *, max_length: int | None = None, batch_tokens: int = 2048, chunk: int = 512,
                   progress: Callable[[int, int], None] | None = None,
                   stats: ScoreStats | None = None) -> list[list[tuple[float, bool]]]:
    """[(log-likelihood, greedy)] per continuation of each (context ids, [continuation ids]).

    max_length: the model's context (default config.max_position_embeddings); longer pairs are
    left-truncated as the harness truncates them. batch_tokens: about how many tokens one call runs
    (memory vs speed). progress(done, total) counts continuations."""
    config = _config_for_scoring(config)
    max_length = max_length or config.max_position_embeddings
    stats = stats if stats is not None else ScoreStats()
    t0 = time.perf_counter()
    out: list[list] = [[None] * len(conts) for _, conts in requests]
    total = sum(len(c) for _, c in requests)
    stats.requests += total
    units = _units(requests, max_length)
    if progress:
        progress(0, total)
    if not units:
        return out
    pl = plan(units, batch_tokens, config.sliding_window)
    done = 0
    for start in range(0, len(pl.rows), pl.b):
        rows = pl.rows[start:start + pl.b]
        b = pl.b  # the last call padded too: one shape per task
        arrays, where = _arrays(pl, rows, b)
        stats.shapes.add((b, pl.p, b * pl.k, pl.length))
        lp, greedy = score_packed(config, params, *map(jnp.asarray, arrays), chunk)
        lp, greedy = np.asarray(lp, np.float64), np.asarray(greedy)
        for row, begin, m, (i, j) in where:
            out[i][j] = (float(lp[row, begin:begin + m].sum()), bool(greedy[row, begin:begin + m].all()))
        stats.batches += 1
        stats.tokens += b * pl.p + b * pl.k * pl.length
        stats.real_tokens += sum(len(u.pre) + sum(map(len, u.items)) for us in rows for u, _ in us)
        done += len(where)
        if progress:
            progress(done, total)
    stats.seconds += time.perf_counter() - t0
    return out
