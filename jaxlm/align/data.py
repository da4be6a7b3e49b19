"""Preference pairs: read, validate, tokenize, truncate, batch.

Records are JSON Lines `{"prompt", "chosen", "rejected"}`. Each value is a string (tokenized as is)
or a list of chat messages (rendered with the Phi chat template; a string prompt with message-list
responses is not allowed). HH-RLHF's shared-prefix form is handled too: when `prompt` is absent, the
prompt is the text up to and including the last "\\n\\nAssistant:" that chosen and rejected share.

Truncation to `max_length` tokens: the prompt keeps its END (at most `max_prompt_length` tokens,
then less if still needed), responses keep their START. Every truncation is counted.

A batch of N pairs is ONE forward over 2N rows laid out [c_1, r_1, c_2, r_2, ...] (pairs stay
together under gradient accumulation and sharding), each row prompt + response, right-padded.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib

import grain
import numpy as np

from jaxlm.data.pipeline import BATCH_KEYS, Shards
from jaxlm.data.sources import Report, check_fraction, open_spec, parse_spec
from jaxlm.data.tokenizer import Tokenizer, apply_chat_template
from jaxlm.errors import DataError

HH_MARK = "\n\nAssistant:"
# the arrays of a batch of pairs: the LM batch's, plus each row's response length and its pair index
KEYS = BATCH_KEYS + ("lengths", "index")


@dataclasses.dataclass
class PrefConfig:
    sources: str
    max_length: int = 512
    max_prompt_length: int = 256
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    add_eos: bool = True
    max_bad_fraction: float = 0.01


def _split_shared_prefix(chosen: str, rejected: str):
    """HH-RLHF form: (prompt, chosen response, rejected response) or None."""
    i, j = chosen.rfind(HH_MARK), rejected.rfind(HH_MARK)
    if i < 0 or j < 0 or chosen[:i] != rejected[:j]:
        return None
    cut = i + len(HH_MARK)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _is_messages(v):
    return isinstance(v, list) and all(isinstance(m, dict) and "role" in m and "content" in m for m in v)


def split_pair(rec: dict, cfg: PrefConfig):
    """(prompt, chosen, rejected, problem or None) of one record, before tokenization: strings, or
    message lists for chat pairs (a string prompt becomes one user message)."""
    p, c, r = rec.get(cfg.prompt_field), rec.get(cfg.chosen_field), rec.get(cfg.rejected_field)
    if c is None or r is None:
        return None, None, None, "missing field"
    if p is None:
        if not (isinstance(c, str) and isinstance(r, str)):
            return None, None, None, "missing field"
        split = _split_shared_prefix(c, r)
        if split is None:
            return None, None, None, "no shared prompt"
        p, c, r = split
    if _is_messages(c) and _is_messages(r):
        msgs = p if _is_messages(p) else ([{"role": "user", "content": p}] if isinstance(p, str) else None)
        if msgs is None:
            return None, None, None, "bad messages"
        if not any(m.get("content", "").strip() for m in c) or not any(m.get("content", "").strip() for m in r):
            return None, None, None, "empty response"
        if c == r:
            return None, None, None, "chosen equals rejected"
        return msgs, c, r, None
    if not all(isinstance(x, str) for x in (p, c, r)):
        return None, None, None, "bad messages"
    if not c.strip() or not r.strip():
        return None, None, None, "empty response"
    if c == r:
        return None, None, None, "chosen equals rejected"
    return p, c, r, None


def pair_problem(rec: dict, cfg: PrefConfig) -> str | None:
    """What makes a record unusable as a preference pair, or None (the reader's validator)."""
    return split_pair(rec, cfg)[3]


def encode_pair(tok: Tokenizer, rec: dict, cfg: PrefConfig):
    """(prompt ids, chosen ids, rejected ids, problem or None) for one record."""
    p, c, r, problem = split_pair(rec, cfg)
    if problem:
        return None, None, None, problem
    if isinstance(c, list):
        pi, _ = apply_chat_template(tok, p, add_generation_prompt=True)
        ci = _reply_ids(tok, p, c)
        ri = _reply_ids(tok, p, r)
        return pi, ci, ri, None
    eos = [tok.eos_id] if cfg.add_eos and tok.eos_id >= 0 else []
    return tok.encode(p, special=False), tok.encode(c, special=False) + eos, tok.encode(r, special=False) + eos, None


def _reply_ids(tok: Tokenizer, prompt_msgs, reply_msgs) -> list[int]:
    """The tokens the model writes after the generation prompt: the whole conversation rendered,
    minus the rendered prompt (with its generation prompt)."""
    full, _ = apply_chat_template(tok, list(prompt_msgs) + list(reply_msgs))
    head, _ = apply_chat_template(tok, prompt_msgs, add_generation_prompt=True)
    if full[:len(head)] != head:
        raise DataError("the chat template renders the prompt differently inside the conversation; "
                        "chat preference pairs need a template whose prefix is stable")
    return full[len(head):]


def truncate(p, c, r, max_length: int, max_prompt_length: int):
    """(p, c, r, truncated?) with len(p) + max(len(c), len(r)) <= max_length."""
    cut = False
    if len(p) + max(len(c), len(r)) > max_length:
        if len(p) > max_prompt_length:
            p, cut = p[-max_prompt_length:], True
        room = max_length - len(p)
        if room < 1:
            p, room, cut = p[-(max_length // 2):], max_length - max_length // 2, True
        if len(c) > room or len(r) > room:
            c, r, cut = c[:room], r[:room], True
    return p, c, r, cut


@dataclasses.dataclass
class Pairs:
    """Tokenized pairs of one source set: prompt / chosen / rejected ids per example."""

    prompts: list
    chosen: list
    rejected: list
    origins: list
    report: Report
    truncated: int
    fingerprint: str

    def __len__(self):
        return len(self.prompts)


def load_pairs(cfg: PrefConfig, tok: Tokenizer) -> Pairs:
    """Read, validate, tokenize and truncate every pair of cfg.sources (bad rows reported by
    file:line; more than cfg.max_bad_fraction bad stops with the report)."""
    prompts, chosen, rejected, origins = [], [], [], []
    report = Report(cfg.sources)
    truncated = 0
    h = hashlib.sha256(f"{cfg.max_length}/{cfg.max_prompt_length}".encode())
    validate = functools.partial(pair_problem, cfg=cfg)
    for spec in parse_spec(cfg.sources):
        src = open_spec(spec, validate)
        report.good += src.report.good
        for kind, n in src.report.bad.items():
            report.bad[kind] += n
            report.examples.setdefault(kind, []).extend(src.report.examples.get(kind, []))
        for i in range(len(src)):
            rec = src[i]
            p, c, r, _ = encode_pair(tok, rec, cfg)
            origin = rec["_origin"]
            p, c, r, cut = truncate(p, c, r, cfg.max_length, cfg.max_prompt_length)
            truncated += cut
            for lst, ids in ((prompts, p), (chosen, c), (rejected, r)):
                lst.append(np.asarray(ids, np.int32))
                h.update(lst[-1].tobytes() + b"|")
            origins.append(origin)
    check_fraction(report, cfg.max_bad_fraction)
    if not prompts:
        raise DataError("\n".join([f"{cfg.sources}: no usable preference pairs"] + report.lines()))
    return Pairs(prompts, chosen, rejected, origins, report, truncated, h.hexdigest()[:16])


def make_rows(pairs: Pairs, idx: np.ndarray, max_length: int, pad_id: int = 0) -> dict:
    """2N rows [c_1, r_1, ...] for the examples `idx`: tokens, targets, loss_mask (response tokens as
    targets), segment_ids (1 real / 0 pad), positions, lengths (response tokens) and index."""
    n = len(idx)
    out = {k: np.zeros((2 * n, max_length), np.int32) for k in ("tokens", "targets", "loss_mask", "segment_ids")}
    lengths = np.zeros(2 * n, np.int32)
    for i, e in enumerate(idx):
        p = pairs.prompts[e]
        for j, resp in enumerate((pairs.chosen[e], pairs.rejected[e])):
            row = 2 * i + j
            seq = np.concatenate([p, resp])
            L = len(seq)
            out["tokens"][row, :L] = seq
            out["targets"][row, :L - 1] = seq[1:]
            out["loss_mask"][row, len(p) - 1:L - 1] = 1  # predictions of the response tokens
            out["segment_ids"][row, :L] = 1
            lengths[row] = len(resp)
    out["tokens"] = np.where(out["segment_ids"] > 0, out["tokens"], pad_id)
    out["positions"] = np.maximum(np.cumsum(out["segment_ids"], axis=1) - 1, 0).astype(np.int32)
    out["lengths"] = lengths
    out["index"] = np.repeat(np.asarray(idx, np.int32), 2)
    return out


class PairStream:
    """The training stream of pairs: seeded per-epoch shuffle, sharded like jaxlm's text stream
    (process p feeds shards [p*S/P, (p+1)*S/P)), checkpointable through grain."""

    def __init__(self, pairs: Pairs, batch_pairs: int, num_shards: int, seed: int, max_length: int, pad_id: int,
                 extra=None):
        if batch_pairs % num_shards:
            raise DataError(f"{batch_pairs} pairs per batch are not divisible by data.num_shards {num_shards}")
        self.pairs, self.batch_pairs, self.num_shards, self.seed = pairs, batch_pairs, num_shards, seed
        self.max_length, self.pad_id, self.extra = max_length, pad_id, extra
        self.reports = [pairs.report]

    def shard(self, s):
        per = self.batch_pairs // self.num_shards
        ds = grain.MapDataset.range(len(self.pairs)).shuffle(seed=self.seed).repeat()[s::self.num_shards]
        ds = ds.batch(per, drop_remainder=True).map(self._rows)
        return ds.to_iter_dataset()

    def _rows(self, idx):
        rows = make_rows(self.pairs, np.asarray(idx), self.max_length, self.pad_id)
        if self.extra is not None:
            rows.update(self.extra(rows["index"]))
        return rows

    def iterator(self, process_index=0, process_count=1):
        if self.num_shards % process_count:
            raise DataError(f"data.num_shards {self.num_shards} is not divisible by {process_count} processes")
        per = self.num_shards // process_count
        return Shards([self.shard(s) for s in range(process_index * per, (process_index + 1) * per)]).__iter__()


def eval_rows(pairs: Pairs, batch_pairs: int, max_length: int, pad_id: int = 0, max_batches: int = 0):
    """Every pair once, in order; the last batch padded with copies of pair 0 (`weight` 0)."""
    n = len(pairs)
    for k, start in enumerate(range(0, n, batch_pairs)):
        if max_batches and k >= max_batches:
            return
        idx = np.arange(start, min(start + batch_pairs, n))
        weight = np.ones(batch_pairs, np.float32)
        if len(idx) < batch_pairs:
            weight[len(idx):] = 0
            idx = np.concatenate([idx, np.zeros(batch_pairs - len(idx), int)])
        rows = make_rows(pairs, idx, max_length, pad_id)
        rows["weight"] = np.repeat(weight, 2)
        yield rows
