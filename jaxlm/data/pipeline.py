"""tokenize -> split long documents -> pack -> batch, on grain, deterministic and resumable.

Each document of n tokens contributes `tokens` d[0:n], `targets` d[1:n] (+ one masked pad) and a
`loss_mask` (0 on the last token, and for chat records on everything the assistant did not say),
so packing never lets a prediction cross a document boundary. The packer (grain's first-fit) adds
`segment_ids` (0 = padding) and `positions` that restart in every document; the model masks
attention across segments.

Determinism and resumption: a training stream is split into `num_shards` independent shards; shard
s reads the seeded, per-epoch reshuffled record order at s, s + S, s + 2S, ... and packs its own
rows. Process p of P feeds the rows of shards [p*S/P, (p+1)*S/P), so the global batch of a step
does not depend on the number of processes when S is fixed. The iterator state (grain's, plus our
counters) is a small JSON dict, saved with every checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence

import grain
import numpy as np

from jaxlm.data.config import DataConfig
from jaxlm.data.sources import BAD_KINDS, Report, check_fraction, lm_validator, open_spec, parse_spec
from jaxlm.data.tokenizer import TINY_SPECIALS, Tokenizer, apply_chat_template, load_tokenizer, train_bpe
from jaxlm.errors import ConfigError, DataError

FIELDS = ("tokens", "targets", "loss_mask", "group")
# The arrays of a language-model batch, each [rows, seq_len] int32: what the model and the loss read.
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# grain's defaults (16 threads reading 500 records ahead) burn the CPU the trainer needs when records
# are long; one reader thread with a short buffer keeps up with tokenisation here.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=8)


class Tokenize:
    """record -> {"ids", "mask", "origin", "group", "source"} (picklable: the tokenizer travels as its
    spec to grain worker processes and is rebuilt there)."""

    def __init__(self, tokenizer: Tokenizer, data: DataConfig, source=0, group_field: str = ""):
        self._tok = tokenizer
        self.text_field, self.messages_field, self.prompt_field = data.text_field, data.messages_field, data.prompt_field
        self.add_eos, self.group_field, self.source = data.add_eos, group_field, source
        self.groups: dict = {}

    def __getstate__(self):
        return dict(self.__dict__, _tok=None, _spec=self._tok.spec())

    def __setstate__(self, state):
        spec = state.pop("_spec")
        self.__dict__.update(state)
        self._tok = load_tokenizer(spec)

    @property
    def tok(self) -> Tokenizer:
        return self._tok

    def __call__(self, rec: dict) -> dict:
        out = {"origin": rec.get("_origin", "?"), "source": self.source, "bad": rec.get("_bad", "")}
        if out["bad"]:
            return out
        msgs = rec.get(self.messages_field)
        if msgs:
            ids, mask = apply_chat_template(self.tok, msgs)
        else:
            ids = self.tok.encode(rec[self.text_field], special=False)
            mask = [1] * len(ids)
            prompt = rec.get(self.prompt_field) if self.prompt_field else None
            if isinstance(prompt, str):  # prompt/completion records: the loss is on the completion only
                p = self.tok.encode(prompt, special=False)
                ids, mask = p + ids, [0] * len(p) + mask
        if self.add_eos and self.tok.eos_id >= 0:
            ids, mask = ids + [self.tok.eos_id], mask + [0 if msgs else 1]
        out["ids"] = np.asarray(ids, np.int32)
        out["mask"] = np.asarray(mask, np.int32)
        key = str(rec.get(self.group_field, "")) if self.group_field else ""
        out["group"] = self.groups.setdefault(key, len(self.groups)) if self.group_field else 0
        return out


def new_counters(num_sources: int) -> dict:
    return {"records": 0, "split": 0, "truncated": 0, "tokens": [0] * num_sources,
            "bad": {}, "bad_examples": {}}


class Documents(grain.IterDataset):
    """Tokenized records -> packable documents of at most seq_len tokens (long ones split or truncated),
    counting records, long records, bad records and tokens per source in the iterator state."""

    def __init__(self, parent, seq_len: int, long_records: str, num_sources: int):
        super().__init__(parent)
        self.seq_len, self.long_records, self.num_sources = seq_len, long_records, num_sources

    def __iter__(self):
        return _DocumentsIterator(self._parent.__iter__(), self.seq_len, self.long_records, self.num_sources)


class _DocumentsIterator(grain.DatasetIterator):
    def __init__(self, parent, seq_len, long_records, num_sources):
        super().__init__(parent)
        self.seq_len, self.long_records = seq_len, long_records
        self.counters = new_counters(num_sources)
        self._rec, self._rec_state, self._chunk = None, None, 0

    def _chunks(self, rec) -> int:
        n = len(rec["ids"])
        return 1 if self.long_records == "truncate" else -(-n // self.seq_len)

    def __next__(self):
        while self._rec is None:
            state = self._parent.get_state()
            rec = next(self._parent)
            c = self.counters
            if rec["bad"]:
                c["bad"][rec["bad"]] = c["bad"].get(rec["bad"], 0) + 1
                ex = c["bad_examples"].setdefault(rec["bad"], [])
                if len(ex) < 3:
                    ex.append(rec["origin"])
                continue
            c["records"] += 1
            if len(rec["ids"]) > self.seq_len:
                c["split" if self.long_records == "split" else "truncated"] += 1
            self._rec, self._rec_state, self._chunk = rec, state, 0
        rec, k, L = self._rec, self._chunk, self.seq_len
        ids, mask = rec["ids"], rec["mask"]
        start = k * L
        piece = ids[start:start + L]
        n = len(piece)
        # targets continue into the next chunk: only the document's very last token predicts nothing
        targets = np.zeros(n, np.int32)
        nxt = ids[start + 1:start + n + 1]
        targets[:len(nxt)] = nxt
        loss = np.zeros(n, np.int32)
        tmask = mask[start + 1:start + n + 1]
        loss[:len(tmask)] = tmask
        self.counters["tokens"][rec["source"]] += n
        self._chunk += 1
        if self._chunk >= self._chunks(rec):
            self._rec = None
        return {"tokens": piece, "targets": targets, "loss_mask": loss,
                "group": np.full(n, rec["group"], np.int32)}

    def get_state(self):
        if self._rec is None:
            return {"parent": self._parent.get_state(), "chunk": 0, "counters": _copy(self.counters)}
        return {"parent": self._rec_state, "chunk": self._chunk, "counters": _copy(self.counters)}

    def set_state(self, state):
        self._parent.set_state(state["parent"])
        self.counters = _copy(state["counters"])
        self._rec = None
        if state["chunk"]:
            rec = next(self._parent)
            self._rec, self._rec_state, self._chunk = rec, state["parent"], state["chunk"]


def _copy(d):
    import copy

    return copy.deepcopy(d)


def _to_batch_fields(row: dict) -> dict:
    return {"tokens": row["tokens"], "targets": row["targets"], "loss_mask": row["loss_mask"],
            "group": row["group"], "segment_ids": row["tokens_segment_ids"], "positions": row["tokens_positions"]}


def pack(docs: grain.IterDataset, seq_len: int, bins: int) -> grain.IterDataset:
    packed = grain.experimental.FirstFitPackIterDataset(
        docs, length_struct={k: seq_len for k in FIELDS}, num_packing_bins=bins, shuffle_bins=False)
    return packed.map(_to_batch_fields)


# ----------------------------------------------------------------------------- train stream
def open_sources(data: DataConfig, sources: str):
    """(specs, opened sources) of a spec string, each validated as language-model records."""
    specs = parse_spec(sources)
    opened = []
    for s in specs:
        src = open_spec(s, lm_validator(data.text_field, data.messages_field))
        if len(src) == 0:
            raise DataError("\n".join([f"data source {s.path!r} has no usable records"] + src.report.lines()))
        check_fraction(src.report, data.max_bad_fraction)
        opened.append(src)
    return specs, opened


def _mean_tokens(src, tokenize: Tokenize, n: int = 64) -> float:
    """Mean tokens per record over a fixed sample (turns token weights into record weights)."""
    idx = np.linspace(0, len(src) - 1, min(n, len(src))).astype(int)
    lens = [len(r.get("ids", ())) for r in (tokenize(src[int(i)]) for i in idx)]
    return max(float(np.mean(lens)), 1.0)


class TrainData:
    """The training stream. `iterator(process_index, process_count)` yields this process's rows of
    each global batch: dicts of numpy [rows, seq_len] (tokens, targets, loss_mask, segment_ids,
    positions, group)."""

    def __init__(self, data: DataConfig, sources: str, tokenizer: Tokenizer, batch_size: int, num_shards: int,
                 seed: int):
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        if batch_size % num_shards:
            raise DataError(f"batch size {batch_size} is not divisible by data.num_shards {num_shards}")
        self.cfg, self.batch_size, self.num_shards, self.seed = data, batch_size, num_shards, seed
        self.specs, self.sources = open_sources(data, sources)
        self.tokenizers = [Tokenize(tokenizer, data, i) for i in range(len(self.sources))]
        # data.train weights are shares of tokens: divide by each source's mean record length
        w = np.array([s.weight for s in self.specs])
        if len(self.sources) > 1:
            w = w / np.array([_mean_tokens(s, t) for s, t in zip(self.sources, self.tokenizers)])
        self.record_weights = (w / w.sum()).tolist()

    @property
    def reports(self) -> list[Report]:
        return [s.report for s in self.sources]

    def shard(self, s: int) -> grain.IterDataset:
        streams = []
        for i, (src, tok) in enumerate(zip(self.sources, self.tokenizers)):
            ds = grain.MapDataset.source(src).shuffle(seed=self.seed * 1009 + i).repeat()
            ds = ds[s::self.num_shards].map(tok)
            streams.append(ds.to_iter_dataset(READ_OPTIONS))
        mixed = streams[0] if len(streams) == 1 else grain.IterDataset.mix(streams, self.record_weights)
        docs = Documents(mixed, self.cfg.seq_len, self.cfg.long_records, len(self.sources))
        rows = pack(docs, self.cfg.seq_len, self.cfg.packing_bins)
        ds = rows.batch(self.batch_size // self.num_shards, drop_remainder=True)
        if self.cfg.num_workers:
            ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=self.cfg.num_workers))
        return ds

    def iterator(self, process_index: int = 0, process_count: int = 1):
        if self.num_shards % process_count:
            raise DataError(f"data.num_shards {self.num_shards} is not divisible by {process_count} processes")
        per = self.num_shards // process_count
        owned = list(range(process_index * per, (process_index + 1) * per))
        ds = Shards([self.shard(s) for s in owned])
        if self.cfg.prefetch:
            ds = grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=self.cfg.prefetch)
        return ds.__iter__()


class Shards(grain.IterDataset):
    """Concatenate the rows of several shard streams, batch by batch (a process's share of the
    global batch: it owns several shards)."""

    def __init__(self, parents: Sequence[grain.IterDataset]):
        super().__init__(list(parents))

    def __iter__(self):
        return _ShardsIterator([p.__iter__() for p in self._parents])


class _ShardsIterator(grain.DatasetIterator):
    def __init__(self, parents):
        super().__init__(parents)

    def __next__(self):
        parts = [next(p) for p in self._parents]
        return {k: np.concatenate([b[k] for b in parts]) for k in parts[0]}

    def get_state(self):
        return {"shards": [p.get_state() for p in self._parents]}

    def set_state(self, state):
        if len(state["shards"]) != len(self._parents):
            raise DataError(f"the data state holds {len(state['shards'])} shards for this process, the run has "
                            f"{len(self._parents)}: resume with the same data.num_shards and process count")
        for p, s in zip(self._parents, state["shards"]):
            p.set_state(s)


def counters(state) -> dict:
    """Sum the counters of every Documents iterator found in a (nested) iterator state."""
    total = None

    def walk(node):
        nonlocal total
        if isinstance(node, dict):
            if "counters" in node and isinstance(node["counters"], dict) and "records" in node["counters"]:
                c = node["counters"]
                if total is None:
                    total = _copy(c)
                else:
                    for k in ("records", "split", "truncated"):
                        total[k] += c[k]
                    total["tokens"] = [a + b for a, b in zip(total["tokens"], c["tokens"])]
                    for k, v in c["bad"].items():
                        total["bad"][k] = total["bad"].get(k, 0) + v
                    for k, v in c["bad_examples"].items():
                        total["bad_examples"].setdefault(k, []).extend(v)
            for v in node.values():
                walk(v)
        elif isinstance(node, list | tuple):
            for v in node:
                walk(v)
    walk(state)
    return total or new_counters(0)


# ----------------------------------------------------------------------------- eval stream
class _Concat(Sequence):
    def __init__(self, sources):
        self.sources = sources
        self.offsets = np.cumsum([0] + [len(s) for s in sources])

    def __len__(self):
        return int(self.offsets[-1])

    def __getitem__(self, i):
        k = int(np.searchsorted(self.offsets, i, side="right") - 1)
        rec = self.sources[k][int(i - self.offsets[k])]
        rec["_source"] = k
        return rec


def eval_batches(data: DataConfig, sources: str, tokenizer: Tokenizer, batch_size: int, max_batches: int = 0,
                 group_field: str = ""):
    """Yield (batch, groups) over the whole eval set, in order, identical on every process. The last
    batch is padded with empty rows (loss_mask 0). `groups` maps group names (values of the record
    field `group_field`) to ids."""
    _, opened = open_sources(data, sources)
    tok = Tokenize(tokenizer, data, group_field=group_field)
    ds = grain.MapDataset.source(_Concat(opened)).map(tok).to_iter_dataset(READ_OPTIONS)
    docs = Documents(ds, data.seq_len, data.long_records, 1)
    rows = pack(docs, data.seq_len, data.packing_bins).batch(batch_size, drop_remainder=False)
    for n, b in enumerate(rows):
        if max_batches and n >= max_batches:
            return
        real = b["tokens"].shape[0]
        if real < batch_size:
            b = {k: np.concatenate([v, np.zeros((batch_size - real,) + v.shape[1:], v.dtype)]) for k, v in b.items()}
        yield b, tok.groups


def train_tokenizer(sources: str, vocab_size: int, text_field: str = "text", max_records: int = 0):
    """A byte-level BPE of `vocab_size` tokens (fewer when the data has no more merges) trained on
    the text of a source spec; `max_records` evenly spaced records per source (0 = all)."""
    minimum = 256 + len(TINY_SPECIALS)
    if vocab_size < minimum:
        raise ConfigError(f"--vocab-size {vocab_size} is below the smallest byte-level BPE: {minimum} "
                          f"(256 bytes + {len(TINY_SPECIALS)} special tokens)")
    data = DataConfig(text_field=text_field, max_bad_fraction=1.0)
    _, opened = open_sources(data, sources)

    def texts():
        for src in opened:
            step = max(1, len(src) // max_records) if max_records else 1
            for i in range(0, len(src), step):
                yield src[i][text_field]

    return train_bpe(texts(), vocab_size)


def check_counters(c: dict, reports: Sequence[Report], max_bad_fraction: float):
    """Stop when lazily detected bad records (ArrayRecord, TFDS) exceed the threshold."""
    bad = sum(c["bad"].values())
    if bad and bad / max(bad + c["records"], 1) > max_bad_fraction:
        r = Report(", ".join(rep.name for rep in reports), good=c["records"])
        for kind, n in c["bad"].items():
            r.bad[kind] = n
            r.examples[kind] = c["bad_examples"].get(kind, [])
        check_fraction(r, max_bad_fraction)


__all__ = ["BAD_KINDS", "BATCH_KEYS", "Documents", "Shards", "Tokenize", "TrainData", "counters", "eval_batches",
           "open_sources", "pack"]
