"""Aggregate metrics and their standard errors, computed as lm-evaluation-harness computes them.

    acc, acc_norm (and lambada's acc)   mean over rows;  stderr = sample stddev (n - 1) / sqrt(n)
    perplexity (lambada)                exp(-mean(log-likelihood));  stderr = bootstrap: 100,000
                                        resamples in chunks of 1,000, chunk i drawn by
                                        random.Random(i).choices(rows, k=n), then the sample stddev

The bootstrap draws exactly the harness's resamples: numpy's MT19937 is loaded with the state of
Python's random.Random(i), and `floor(random() * n)` is what `choices` computes, so the same rows are
drawn, only vectorised. Plus the interval used by the judged evals (`bootstrap_ci`).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import numpy as np

BOOTSTRAP_ITERS = 100_000  # the harness's default bootstrap_iters
BOOTSTRAP_CHUNK = 1000


def mean(xs: Sequence[float]) -> float:
    return sum(xs) / len(xs)


def sample_stddev(xs: Sequence[float]) -> float:
    mu = mean(xs)
    return math.sqrt(sum([(x - mu) ** 2 for x in xs]) / (len(xs) - 1))


def mean_stderr(xs: Sequence[float]) -> float:
    """Standard error of a mean (the harness's `mean_stderr`); None for fewer than 2 rows."""
    return sample_stddev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None


def perplexity(lls: Sequence[float]) -> float:
    return math.exp(-mean(lls))


def _python_random_rows(seed: int, n: int, draws: int) -> np.ndarray:
    """Row indices [draws, n] equal to random.Random(seed).choices(range(n), k=n), `draws` times."""
    state = random.Random(seed).getstate()[1]
    rs = np.random.RandomState()
    rs.set_state(("MT19937", np.asarray(state[:624], dtype=np.uint32), state[624]))
    return np.floor(rs.random_sample(draws * n) * n).astype(np.int64).reshape(draws, n)


def bootstrap_stderr(stat: Callable[[np.ndarray], np.ndarray], xs: Sequence[float], iters: int = BOOTSTRAP_ITERS) -> float:
    """The harness's bootstrap_stderr. `stat` maps resampled values [draws, n] to one value per draw."""
    values = np.asarray(xs, np.float64)
    chunk = min(BOOTSTRAP_CHUNK, iters)
    res = []
    for i in range(iters // chunk):
        res.append(stat(values[_python_random_rows(i, len(values), chunk)]))
    return sample_stddev(np.concatenate(res).tolist())


def perplexity_stderr(lls: Sequence[float], iters: int = BOOTSTRAP_ITERS) -> float | None:
    if len(lls) < 2 or iters <= 0:
        return None
    return bootstrap_stderr(lambda s: np.exp(-s.sum(axis=1) / s.shape[1]), lls, iters)


def bootstrap_ci(values: Sequence[float], level: float = 0.95, iters: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of `values` (seeded, so reports are reproducible)."""
    x = np.asarray(values, np.float64)
    if len(x) == 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (iters, len(x)))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)
