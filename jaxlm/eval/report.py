"""Results files and tables: one JSON per run, laid out like lm-evaluation-harness's results file
("results": {task: {"acc,none": ..., "acc_stderr,none": ...}}, "n-samples", "configs"), plus jaxlm's
extra tables (XSTest per type, refusals per source and category, pairwise records) and timings.

`summary_rows` gives the one table a run prints; `compare_rows` the before/after table of two runs
(the difference, with the combined standard error where both sides have one)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from jaxlm.errors import DataError

FILTER = "none"
# metrics shown in tables, in this order; the rest stay in the file
SHOWN = ("acc", "acc_norm", "perplexity", "over_refusal", "safety", "usefulness", "f1", "refusal", "win_rate")
LOWER_IS_BETTER = {"perplexity", "over_refusal", "loss"}


def results_document(outcomes, meta: dict) -> dict:
    doc = {"results": {}, "n-samples": {}, "configs": {}, "tables": {}, "jaxlm": dict(meta, seconds={})}
    for o in outcomes:
        doc["results"][o.task] = {"alias": o.task, **{f"{k},{FILTER}": v for k, v in o.metrics.items()}}
        doc["n-samples"][o.task] = {"original": o.n_total, "effective": o.n}
        doc["configs"][o.task] = o.config
        if o.tables:
            doc["tables"][o.task] = o.tables
        doc["jaxlm"]["seconds"][o.task] = round(o.seconds, 3)
    return doc


def read_results(path: str) -> dict:
    """A results file written by `jaxlm eval --output` (or the harness's own results JSON)."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: no such results file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise DataError(f"{path}: not a results file (no 'results' object)")
    return doc


def metrics_of(doc: dict) -> dict[str, dict[str, tuple]]:
    """{task: {metric: (value, stderr or None)}} of a results document (harness keys 'm,filter')."""
    out = {}
    for task, res in doc["results"].items():
        vals = {}
        for key, v in res.items():
            name = key.split(",")[0]
            if name == "alias" or name.endswith("_stderr") or not isinstance(v, (int, float)) or isinstance(v, bool):
                continue
            se = res.get(key.replace(name, f"{name}_stderr", 1))
            vals[name] = (float(v), float(se) if isinstance(se, (int, float)) and not isinstance(se, bool) else None)
        out[task.removeprefix("jaxlm_")] = vals
    return out


def _shown(metrics: dict) -> list[str]:
    return [m for m in SHOWN if m in metrics]


def summary_rows(doc: dict) -> list[tuple]:
    """(task, metric, value, stderr, n) for the table a run prints."""
    rows = []
    for task, vals in metrics_of(doc).items():
        n = doc.get("n-samples", {}).get(task, {}).get("effective", "")
        for m in _shown(vals):
            rows.append((task, m, vals[m][0], vals[m][1], n))
    return rows


def compare_rows(a: dict, b: dict) -> list[tuple]:
    """(task, metric, A, B, B - A, combined stderr or None, better: '+' | '-' | '') for the metrics
    both runs have. 'better' marks a change beyond twice the combined standard error."""
    ma, mb = metrics_of(a), metrics_of(b)
    rows = []
    for task in [t for t in ma if t in mb]:
        for m in _shown(ma[task]):
            if m not in mb[task]:
                continue
            (va, sa), (vb, sb) = ma[task][m], mb[task][m]
            se = math.sqrt(sa ** 2 + sb ** 2) if sa is not None and sb is not None else None
            delta = vb - va
            mark = ""
            if se and abs(delta) > 2 * se:
                mark = "+" if (delta < 0) == (m in LOWER_IS_BETTER) else "-"
            rows.append((task, m, va, vb, delta, se, mark))
    return rows


def fmt(x, digits: int = 4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{digits}f}" if abs(x) < 1000 else f"{x:.1f}"
    return str(x)
