"""Shared fitting machinery for the scaling laws: tables in, robust fits and confidence intervals out.

* `read_table` / `as_records`: CSV or JSONL results tables; every error names the file, line and column.
* `fit_huber`: Chinchilla's approach 3 (Hoffmann et al., 2022, App. D.2) -- a Huber loss on the residuals
  of log-loss, minimised with L-BFGS-B. The grid of initialisations is scored in one vectorised pass
  and L-BFGS starts from the best few points, which finds the same optimum as starting from every
  point at a small fraction of the cost.
* `bootstrap`: percentile confidence intervals from refits on rows resampled with replacement.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import json
import math
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from scipy.optimize import minimize

from jaxlm.errors import ScalingError

HUBER_DELTA = 1e-3  # Chinchilla's delta for residuals of log-loss
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson")




# ----------------------------------------------------------------------------- tables
def read_table(path, required: Sequence[str] = ()) -> list[dict]:
    """Rows of a CSV (header line) or JSONL (one object per line) results table.

    Cells are kept as read (strings for CSV); `as_records` converts and validates them. Every row
    carries `_where` = "FILE:LINE" so later errors can point at it. Extra columns are kept.
    """
    path = Path(path)
    if not path.is_file():
        raise ScalingError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from spreadsheet exports
    except (OSError, UnicodeDecodeError) as e:
        raise ScalingError(f"{path}: cannot read ({e})") from e
    rows = []
    if path.suffix.lower() in JSON_SUFFIXES:
        for line_no, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ScalingError(f"{path}:{line_no}: not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ScalingError(f"{path}:{line_no}: expected a JSON object, got {type(row).__name__}")
            rows.append({**row, "_where": f"{path}:{line_no}"})
    else:
        reader = csv.DictReader(text.splitlines())
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise ScalingError(f"{path}:1: missing column {missing[0]!r} (header has: {', '.join(header)})")
        reader.fieldnames = header
        for row in reader:
            if None in row:
                raise ScalingError(f"{path}:{reader.line_num}: more cells than header columns")
            if all(v in (None, "") for v in row.values()):
                continue
            rows.append({**row, "_where": f"{path}:{reader.line_num}"})
    if not rows:
        raise ScalingError(f"{path}: no rows")
    return rows


def as_records(rows: Iterable, numeric: Sequence[str], strings: Sequence[str] = (),
               optional: Sequence[str] = (), source: str = "rows") -> list[dict]:
    """Validated copies of `rows`: `numeric` (and present `optional`) columns as finite floats.

    Other columns are kept; numeric-looking strings among them become floats so that mixture
    columns read from a CSV compare as numbers.
    """
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ScalingError(f"{source}: row {i} is a {type(row).__name__}, not a dict")
        where = row.get("_where", f"{source}: row {i}")
        rec = {"_where": where}
        for col in list(strings) + list(numeric):
            if col not in row or row[col] in (None, ""):
                have = ", ".join(k for k in row if k != "_where")
                raise ScalingError(f"{where}: missing column {col!r} (row has: {have})")
        for key, value in row.items():
            if key == "_where":
                continue
            if key in strings:
                rec[key] = str(value)
            elif key in numeric or key in optional:
                rec[key] = _number(value, where, key)
            else:
                rec[key] = _maybe_number(value)
        out.append(rec)
    if not out:
        raise ScalingError(f"{source}: no rows")
    return out


def _number(value, where, col) -> float:
    if isinstance(value, bool):
        raise ScalingError(f"{where}: column {col!r}: {value!r} is not a number")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ScalingError(f"{where}: column {col!r}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise ScalingError(f"{where}: column {col!r}: {value!r} is not finite")
    return x


def _maybe_number(value):
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def require(records, col: str, low: float = 0.0, high: float = math.inf, low_open: bool = True,
            what: str = "") -> None:
    """Every record's `col` in (low, high] (or [low, high] when not `low_open`), else a named error."""
    for r in records:
        x = r[col]
        if (x <= low if low_open else x < low) or x > high:
            interval = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else (
                f"> {low:g}" if low_open else f">= {low:g}")
            raise ScalingError(f"{r['_where']}: column {col!r} must be {interval}{what}, got {x:g}")


# ----------------------------------------------------------------------------- robust fit
@contextlib.contextmanager
def single_threaded_blas():
    """Run scipy's BLAS on one thread: L-BFGS-B (scipy >= 1.15) makes many tiny BLAS calls and with a
    threaded OpenBLAS on a busy machine runs 10-50x slower (scipy/scipy#22438)."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def huber(r, delta: float = HUBER_DELTA):
    """Huber loss: r^2/2 for |r| <= delta, delta (|r| - delta/2) beyond."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def grid(**axes: Sequence[float]) -> np.ndarray:
    """Cartesian product of per-parameter values, shape (points, parameters), in the given order."""
    return np.array(list(itertools.product(*axes.values())), dtype=float)


def fit_huber(predict: Callable, y: np.ndarray, inits: np.ndarray, delta: float = HUBER_DELTA,
              n_starts: int = 8, bounds=None) -> tuple[np.ndarray, float]:
    """Minimise sum_k huber(predict(theta)_k - y_k) over theta; (best theta, objective).

    `predict(theta, jac)` maps a parameter array of shape (..., P) to predictions (..., n); for a
    1-D theta with `jac=True` it returns (pred, d pred / d theta of shape (n, P)). Every row of
    `inits` is scored first; L-BFGS-B runs from the `n_starts` best.
    """
    y = np.asarray(y, float)
    inits = np.atleast_2d(np.asarray(inits, float))
    scale = 1.0 / (delta * len(y))  # keeps the objective O(|residual|) so default tolerances apply

    chunk = max(1, 2**21 // max(len(y), 1))
    scores = np.concatenate([
        (huber(predict(inits[i:i + chunk], False) - y, delta).sum(-1)) for i in range(0, len(inits), chunk)])
    scores = np.where(np.isfinite(scores), scores, np.inf)
    starts = inits[np.argsort(scores, kind="stable")[:n_starts]]

    def objective(theta):
        pred, jac = predict(theta, True)
        r = pred - y
        if not np.all(np.isfinite(r)):
            return 1e30, np.zeros_like(theta)
        value = huber(r, delta).sum() * scale
        grad = (np.clip(r, -delta, delta) @ jac) * scale
        return value, grad

    best, best_value = None, np.inf
    with single_threaded_blas():
        for theta0 in starts:
            res = minimize(objective, theta0, jac=True, method="L-BFGS-B", bounds=bounds,
                           options={"maxiter": 2000, "ftol": 1e-13, "gtol": 1e-10})
            if np.all(np.isfinite(res.x)) and res.fun < best_value:
                best, best_value = res.x, float(res.fun)
    if best is None:
        raise ScalingError("the fit diverged from every initialisation")
    return best, best_value / scale


def bootstrap(refit: Callable[[np.ndarray], np.ndarray], n_rows: int, n_boot: int,
              seed: int = 0) -> np.ndarray:
    """Parameter vectors from `refit(indices)` on `n_boot` resamples of rows; shape (n_boot, P)."""
    rng = np.random.default_rng(seed)
    draws = [refit(rng.integers(0, n_rows, n_rows)) for _ in range(n_boot)]
    return np.array(draws, dtype=float)


def percentile_ci(draws: np.ndarray, level: float = 0.95) -> list[tuple[float, float]]:
    """(low, high) per column of bootstrap draws at the given two-sided level."""
    lo, hi = np.nanpercentile(draws, [50 * (1 - level), 50 * (1 + level)], axis=0)
    return [(float(a), float(b)) for a, b in zip(np.atleast_1d(lo), np.atleast_1d(hi))]


def rmse(residuals) -> float:
    return float(np.sqrt(np.mean(np.square(residuals))))
