"""Random-access record sources with bad-row accounting.

Every source is a Sequence of record dicts, each with an `_origin` ("file:line" or "path#index")
so that any problem downstream can be traced to its input. JSON Lines (plain or .gz) and Parquet
sources are validated while they are indexed: malformed JSON, a missing field, an empty text and
non-UTF-8 bytes are counted and reported with file:line, never silently dropped. ArrayRecord and
TFDS sources are too large to scan up front; their bad records are marked (`_bad`) and counted
downstream by the pipeline.

Source specs (config `data.train` / `data.eval`): 'PATH[a:b]@WEIGHT, ...' where PATH is a file or
glob (.jsonl, .jsonl.gz, .json, .parquet, .csv), `arrayrecord:PATH`, `tfds:NAME[/CONFIG]:SPLIT` or
`asset:NAME` (data shipped with jaxlm); `[a:b]` selects usable records a..b.

What makes a record usable is the reader's `validate(record) -> problem or None`: language-model
text or chat records (`lm_validator`), preference pairs, prompts, benchmark rows... Every reader of
records in jaxlm goes through `open_source` / `read_records`, so every one reports bad rows the same
way.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import glob as globlib
import gzip
import io
import json
import mmap
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from jaxlm.errors import DataError

BAD_KINDS = ("malformed JSON", "not an object", "missing field", "empty text", "bad messages", "non-UTF-8",
             "too long")
EXAMPLES_PER_KIND = 3
Validator = Callable[[dict], "str | None"]


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


def validate_record(obj, text_field: str = "text", messages_field: str = "messages") -> str | None:
    """The kind of problem with a language-model record (plain text or chat messages), or None when it
    is usable."""
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


def lm_validator(text_field: str = "text", messages_field: str = "messages") -> Validator:
    """validate_record for these fields (picklable, for grain worker processes)."""
    return functools.partial(validate_record, text_field=text_field, messages_field=messages_field)


def any_object(obj) -> str | None:
    """Accept every JSON object (the reader's own checks still apply)."""
    return None if isinstance(obj, dict) else "not an object"


# ----------------------------------------------------------------------------- JSON Lines
class JsonlSource(Sequence):
    """Records of one or more JSON Lines files (plain or gzip), indexed and validated on open.
    `bad_lines` keeps (file, line) of every bad record, so a selection [a:b] can count its own."""

    def __init__(self, paths: Sequence[str], validate: Validator = any_object, name=None):
        self.paths = [str(p) for p in paths]
        self.validate = validate
        self.report = Report(name or ",".join(self.paths))
        self.bad_lines: list[tuple[int, int, str]] = []  # (file, line, kind)
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
                kind, detail = None, ""
                try:
                    obj = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError as e:
                    kind, detail = "non-UTF-8", f"byte {e.start}"
                except json.JSONDecodeError as e:
                    kind, detail = "malformed JSON", e.msg
                else:
                    kind = any_object(obj) or self.validate(obj)
                if kind:
                    self.report.add_bad(kind, origin, detail)
                    self.bad_lines.append((f, line, kind))
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

    def origin_of(self, i) -> tuple[int, int]:
        """(file, line) of good record i."""
        f, _, _, line = self._index[i]
        return f, line

    def __getstate__(self):  # picklable for grain worker processes: reopen the files there
        return {"paths": self.paths, "validate": self.validate, "report": self.report, "index": self._index,
                "bad_lines": self.bad_lines}

    def __setstate__(self, s):
        self.paths, self.validate, self.report = s["paths"], s["validate"], s["report"]
        self._index, self.bad_lines = s["index"], s["bad_lines"]
        self._blobs = [self._open(p) for p in self.paths]


# ----------------------------------------------------------------------------- Parquet
class _RowsSource(Sequence):
    """Rows of tabular files read whole (Parquet, CSV), validated on open."""

    def __init__(self, paths, validate: Validator = any_object, name=None):
        self.paths = [str(p) for p in paths]
        self.report = Report(name or ",".join(self.paths))
        self.bad_lines: list[tuple[int, int, str]] = []
        self._rows, self._lines = [], []
        for f, path in enumerate(self.paths):
            for r, obj in self._read(path):
                kind = validate(obj)
                if kind:
                    self.report.add_bad(kind, f"{path}:{r}")
                    self.bad_lines.append((f, r, kind))
                else:
                    obj["_origin"] = f"{path}:{r}"
                    self._rows.append(obj)
                    self._lines.append((f, r))
                    self.report.good += 1

    def _read(self, path):
        raise NotImplementedError

    def __len__(self):
        return len(self._rows)

    def __getitem__(self, i):
        return dict(self._rows[i])

    def origin_of(self, i) -> tuple[int, int]:
        return self._lines[i]


class ParquetSource(_RowsSource):
    """Rows of Parquet files; origins are 'file:row N' (1-based)."""

    def _read(self, path):
        import pyarrow.parquet as pq

        for r, obj in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield f"row {r}", obj


class CsvSource(_RowsSource):
    """Rows of CSV files with a header; origins are 'file:line' (the header is line 1)."""

    def _read(self, path):
        try:
            text = Path(path).read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 (byte {e.start})") from None
        reader = csv.DictReader(io.StringIO(text, newline=""))
        for row in reader:
            yield reader.line_num, {k: v for k, v in row.items() if k is not None}


# ----------------------------------------------------------------------------- lazy sources
class _LazySource(Sequence):
    """Wraps a random-access source of raw records; decodes and validates each on access."""

    def __init__(self, inner, name, validate: Validator):
        self.inner, self.name, self.validate = inner, name, validate
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
        kind = any_object(rec) or self.validate(rec)
        rec = rec if isinstance(rec, dict) else {}
        rec["_origin"] = origin
        if kind:
            rec["_bad"] = kind
        return rec


def _arrayrecord(paths, validate, name):
    import grain

    return _LazySource(grain.sources.ArrayRecordDataSource(list(paths)), name, validate)


def _tfds(spec, validate, name):
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise DataError(f"{spec}: TFDS sources need the tfds extra: pip install 'jaxlm[tfds]'") from e
    body = spec[len("tfds:"):]
    ds_name, _, split = body.rpartition(":")
    if not ds_name:
        raise DataError(f"{spec}: TFDS sources look like tfds:NAME[/CONFIG]:SPLIT")
    return _LazySource(tfds.data_source(ds_name, split=split), name, validate)


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
    """Records a..b of a source. Its report counts the selected records and the bad rows that lie
    among them (between the first and the last selected record), not the whole file."""

    def __init__(self, inner, select: slice, name: str):
        self.inner, self.idx = inner, range(len(inner))[select]
        self.report = Report(name, good=len(self.idx))
        if len(self.idx) and hasattr(inner, "origin_of"):
            first, last = inner.origin_of(self.idx[0]), inner.origin_of(self.idx[-1])
            for f, line, kind in getattr(inner, "bad_lines", ()):
                if first <= (f, line) <= last:
                    self.report.add_bad(kind, f"{inner.paths[f]}:{line}")

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.inner[self.idx[i]]


def open_spec(spec: SourceSpec, validate: Validator = any_object):
    src = open_source(spec.path, validate)
    if spec.select is None:
        return src
    sel = spec.select
    return Subset(src, sel, f"{spec.path}[{'' if sel.start is None else sel.start}:{'' if sel.stop is None else sel.stop}]")


def open_source(path: str, validate: Validator = any_object):
    """One source (possibly several files) from one PATH of a spec."""
    if path.startswith("tfds:"):
        return _tfds(path, validate, path)
    if path.startswith("arrayrecord:"):
        files = resolve_paths(path[len("arrayrecord:"):])
        return _arrayrecord(files, validate, path)
    files = resolve_paths(path)
    if all(f.endswith(".parquet") for f in files):
        return ParquetSource(files, validate, name=path)
    if all(f.endswith(".csv") for f in files):
        return CsvSource(files, validate, name=path)
    if any(f.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")) for f in files):
        return JsonlSource(files, validate, name=path)
    if all(f.endswith((".arrayrecord", ".array_record")) for f in files):
        return _arrayrecord(files, validate, path)
    raise DataError(f"cannot tell the format of {path!r}: use .jsonl[.gz], .parquet, .csv, arrayrecord: or tfds:")


def read_records(spec: str, validate: Validator = any_object, max_bad_fraction: float = 1.0,
                 what: str = "records") -> tuple[list[dict], list[Report]]:
    """Every usable record of a source spec ('PATH[a:b], ...'), in order, each with its `_origin`
    ('file:line'), and one Report per source. More than `max_bad_fraction` bad stops with the report;
    no usable record at all is an error naming the spec."""
    records, reports = [], []
    for s in parse_spec(spec):
        src = open_spec(s, validate)
        check_fraction(src.report, max_bad_fraction)
        reports.append(src.report)
        for i in range(len(src)):
            rec = src[i]
            if "_bad" not in rec:
                records.append(rec)
    if not records:
        raise DataError("\n".join([f"{spec}: no usable {what}"] + [line for r in reports for line in r.lines()]))
    return records, reports


def read_all_or_fail(spec: str, check: Callable[[dict], str | None] = lambda rec: None,
                     what: str = "records", row: str = "row") -> list[dict]:
    """Every record of `spec` (each with `_origin`), where any bad row is an error naming its file:line:
    for data where a skipped row would change the result (benchmarks, evaluation prompts).
    `check(record)` returns a problem ("missing field 'x'", ...) or None; `row` names a row in the
    error ("xstest row has missing field 'type'")."""
    records, reports = read_records(spec, what=what)
    for rep in reports:
        if rep.bad:
            kind = sorted(rep.bad)[0]
            raise DataError(f"{rep.examples[kind][0]}: {kind} ({sum(rep.bad.values())} bad rows in {rep.name})")
    for rec in records:
        problem = check(rec)
        if problem:
            raise DataError(f"{rec['_origin']}: {row} has {problem}" if problem.startswith("missing")
                            else f"{rec['_origin']}: {row}: {problem}")
    return records

