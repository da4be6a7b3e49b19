"""Random-access record sources with bad-row accounting.

Every source is a Sequence of record dicts, each with an `_origin` ("file:line" or "path#index")
so that any problem downstream can be traced to its input. JSON Lines (plain or .gz) and Parquet
sources are validated while they are indexed: malformed JSON, a missing field, an empty text and
non-UTF-8 bytes are counted and reported with file:line, never silently dropped. ArrayRecord and
TFDS sources are too large to scan up front; their bad records are marked (`_bad`) and counted
downstream by the pipeline.

Source specs (config `data.train` / `data.eval`): 'PATH[@WEIGHT], PATH[@WEIGHT], ...' where PATH is
a file or glob (.jsonl, .jsonl.gz, .json, .parquet), `arrayrecord:PATH`, `tfds:NAME[/CONFIG]:SPLIT`
or `asset:NAME` (data shipped with jaxlm).
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import json
import mmap
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

BAD_KINDS = ("malformed JSON", "not an object", "missing field", "empty text", "bad messages", "non-UTF-8",
             "too long")
EXAMPLES_PER_KIND = 3


class DataError(ValueError):
    """Input that cannot be used; the message says which file and line."""


@dataclasses.dataclass
class Report:
    """Counts of good and bad records of one source, with the first few offenders of each kind."""

    name: str
    good: int = 0
    bad: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=dict)

    def add_bad(self, kind: str, origin: str, detail: str = ""):
        self.bad[kind] += 1
        ex = self.examples.setdefault(kind, [])
        if len(ex) < EXAMPLES_PER_KIND:
            ex.append(f"{origin}" + (f" ({detail})" if detail else ""))

    @property
    def total(self) -> int:
        return self.good + sum(self.bad.values())

    @property
    def bad_fraction(self) -> float:
        return sum(self.bad.values()) / max(self.total, 1)

    def lines(self) -> list[str]:
        out = [f"{self.name}: {self.good} good records, {sum(self.bad.values())} bad"]
        for kind, n in sorted(self.bad.items()):
            out.append(f"  {kind}: {n}, e.g. " + "; ".join(self.examples.get(kind, [])))
        return out


def check_fraction(report: Report, max_bad_fraction: float):
    if report.bad_fraction > max_bad_fraction:
        raise DataError("\n".join([f"{report.name}: {report.bad_fraction:.1%} of records are bad, more than "
                                   f"data.max_bad_fraction={max_bad_fraction:.1%}"] + report.lines()))


def validate_record(obj, text_field: str, messages_field: str) -> str | None:
    """The kind of problem with a decoded record, or None when it is usable."""
    if not isinstance(obj, dict):
        return "not an object"
    if messages_field in obj and obj[messages_field] is not None:
        msgs = obj[messages_field]
        if not isinstance(msgs, list) or not msgs or not all(
                isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") for m in msgs):
            return "bad messages"
        if not any(m["role"] == "assistant" and m["content"].strip() for m in msgs):
            return "bad messages"
        return None
    if text_field not in obj or obj[text_field] is None:
        return "missing field"
    if not isinstance(obj[text_field], str) or not obj[text_field].strip():
        return "empty text"
    return None


# ----------------------------------------------------------------------------- JSON Lines
class JsonlSource(Sequence):
    """Records of one or more JSON Lines files (plain or gzip), indexed and validated on open."""

    def __init__(self, paths: Sequence[str], text_field="text", messages_field="messages", name=None):
        self.paths = [str(p) for p in paths]
        self.text_field, self.messages_field = text_field, messages_field
        self.report = Report(name or ",".join(self.paths))
        self._blobs, self._index = [], []  # blob per file; (file, start, end, line) per good record
        for f, path in enumerate(self.paths):
            blob = self._open(path)
            self._blobs.append(blob)
            self._scan(f, path, blob)

    @staticmethod
    def _open(path):
        if path.endswith(".gz"):
            with gzip.open(path, "rb") as fh:
                return fh.read()
        with open(path, "rb") as fh:
            if Path(path).stat().st_size == 0:
                return b""
            return mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)

    def _scan(self, f, path, blob):
        start, line = 0, 0
        n = len(blob)
        while start < n:
            end = blob.find(b"\n", start)
            end = n if end < 0 else end
            line += 1
            raw = blob[start:end]
            if raw.strip():
                origin = f"{path}:{line}"
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    self.report.add_bad("non-UTF-8", origin, f"byte {e.start}")
                else:
                    try:
                        obj = json.loads(text)
                    except json.JSONDecodeError as e:
                        self.report.add_bad("malformed JSON", origin, e.msg)
                    else:
                        kind = validate_record(obj, self.text_field, self.messages_field)
                        if kind:
                            self.report.add_bad(kind, origin)
                        else:
                            self._index.append((f, start, end, line))
                            self.report.good += 1
            start = end + 1

    def __len__(self):
        return len(self._index)

    def __getitem__(self, i):
        f, start, end, line = self._index[i]
        rec = json.loads(self._blobs[f][start:end])
        rec["_origin"] = f"{self.paths[f]}:{line}"
        return rec

    def __getstate__(self):  # picklable for grain worker processes: reopen the files there
        return {"paths": self.paths, "text_field": self.text_field, "messages_field": self.messages_field,
                "report": self.report, "index": self._index}

    def __setstate__(self, s):
        self.paths, self.text_field, self.messages_field = s["paths"], s["text_field"], s["messages_field"]
        self.report, self._index = s["report"], s["index"]
        self._blobs = [self._open(p) for p in self.paths]


# ----------------------------------------------------------------------------- Parquet
class ParquetSource(Sequence):
    """Rows of Parquet files (text or messages column), validated on open."""

    def __init__(self, paths, text_field="text", messages_field="messages", name=None):
        import pyarrow.parquet as pq

        self.paths = [str(p) for p in paths]
        self.report = Report(name or ",".join(self.paths))
        self._rows = []
        for path in self.paths:
            table = pq.read_table(path)
            for r, obj in enumerate(table.to_pylist(), start=1):
                kind = validate_record(obj, text_field, messages_field)
                if kind:
                    self.report.add_bad(kind, f"{path}:row {r}")
                else:
                    obj["_origin"] = f"{path}:row {r}"
                    self._rows.append(obj)
                    self.report.good += 1

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        return dict(self._rows[i])


# ----------------------------------------------------------------------------- lazy sources
class _LazySource(Sequence):
    """Wraps a random-access source of raw records; decodes and validates each on access."""

    def __init__(self, inner, name, text_field, messages_field):
        self.inner, self.name = inner, name
        self.text_field, self.messages_field = text_field, messages_field
        self.report = Report(name)  # counted downstream (the pipeline), not here

    def __len__(self):
        return len(self.inner)

    def _decode(self, raw):
        if isinstance(raw, bytes):
            return json.loads(raw.decode("utf-8"))
        return {k: (v.decode("utf-8") if isinstance(v, bytes) else v) for k, v in dict(raw).items()}

    def __getitem__(self, i):
        origin = f"{self.name}#{i}"
        try:
            rec = self._decode(self.inner[i])
        except UnicodeDecodeError:
            return {"_origin": origin, "_bad": "non-UTF-8"}
        except (json.JSONDecodeError, ValueError):
            return {"_origin": origin, "_bad": "malformed JSON"}
        kind = validate_record(rec, self.text_field, self.messages_field)
        rec = rec if isinstance(rec, dict) else {}
        rec["_origin"] = origin
        if kind:
            rec["_bad"] = kind
        return rec


def _arrayrecord(paths, text_field, messages_field, name):
    import grain

    return _LazySource(grain.sources.ArrayRecordDataSource(list(paths)), name, text_field, messages_field)


def _tfds(spec, text_field, messages_field, name):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{spec}: TFDS sources need the tfds extra: pip install 'jaxlm[tfds]'") from e
    body = spec[len("tfds:"):]
    ds_name, _, split = body.rpartition(":")
    if not ds_name:
        raise DataError(f"{spec}: TFDS sources look like tfds:NAME[/CONFIG]:SPLIT")
    return _LazySource(tfds.data_source(ds_name, split=split), name, text_field, messages_field)


# ----------------------------------------------------------------------------- specs
@dataclasses.dataclass
class SourceSpec:
    path: str
    weight: float
    select: slice | None = None  # PATH[a:b]: only usable records a..b (for train / held-out splits)


def parse_spec(spec: str) -> list[SourceSpec]:
    """'PATH[a:b]@WEIGHT, ...' -> [SourceSpec]; the record range and the weight are optional."""
    import re

    out = []
    for part in (p.strip() for p in str(spec).split(",")):
        if not part:
            continue
        path, _, weight = part.rpartition("@") if "@" in part else (part, "", "1")
        try:
            w = float(weight)
        except ValueError:
            raise DataError(f"bad weight {weight!r} in data source {part!r}") from None
        if w <= 0:
            raise DataError(f"data source {part!r} has weight {w}; weights must be positive")
        m = re.fullmatch(r"(.*)\[(-?\d*):(-?\d*)\]", path)
        select = None
        if m:
            path = m.group(1)
            select = slice(int(m.group(2)) if m.group(2) else None, int(m.group(3)) if m.group(3) else None)
        out.append(SourceSpec(path, w, select))
    if not out:
        raise DataError("no data sources given (data.train is empty)")
    return out


def resolve_paths(path: str) -> list[str]:
    if path.startswith("asset:"):
        from jaxlm import ASSETS

        path = str(ASSETS / path[len("asset:"):])
    files = sorted(globlib.glob(path)) if any(c in path for c in "*?[") else [path]
    missing = [f for f in files if not Path(f).exists()]
    if not files or missing:
        raise DataError(f"data source {path!r} matches no files" if not files else f"data file {missing[0]} not found")
    return files


class Subset(Sequence):
    """Records a..b of a source (its report still counts the whole source)."""

    def __init__(self, inner, select: slice):
        self.inner, self.idx = inner, range(len(inner))[select]
        self.report = inner.report

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.inner[self.idx[i]]


def open_spec(spec: SourceSpec, text_field="text", messages_field="messages"):
    src = open_source(spec.path, text_field, messages_field)
    return Subset(src, spec.select) if spec.select is not None else src


def open_source(path: str, text_field="text", messages_field="messages"):
    """One source (possibly several files) from one PATH of a spec."""
    if path.startswith("tfds:"):
        return _tfds(path, text_field, messages_field, path)
    if path.startswith("arrayrecord:"):
        files = resolve_paths(path[len("arrayrecord:"):])
        return _arrayrecord(files, text_field, messages_field, path)
    files = resolve_paths(path)
    kinds = {".parquet" if f.endswith(".parquet") else ".jsonl" for f in files}
    if kinds == {".parquet"}:
        return ParquetSource(files, text_field, messages_field, name=path)
    if any(f.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")) for f in files):
        return JsonlSource(files, text_field, messages_field, name=path)
    if all(f.endswith((".arrayrecord", ".array_record")) for f in files):
        return _arrayrecord(files, text_field, messages_field, path)
    raise DataError(f"cannot tell the format of {path!r}: use .jsonl[.gz], .parquet, arrayrecord: or tfds:")
