"""Multilingual scaling law by language family, and the sampling ratios it implies.

He et al., 2024, "Scaling Laws for Multilingual Language Models": the test loss of language family i
depends on the mixture only through its own sampling ratio p_i,

    L_i(N, D, p_i) = (E_i + A_i N^-alpha_i + B_i D^-beta_i) * p_i^-gamma_i

with N the non-embedding parameters and D the training tokens. Fitting is Chinchilla's approach 3
(Huber loss on log-loss, L-BFGS from a grid; see `fitting`). Minimising a weighted sum of the family
losses over the simplex gives the optimal sampling ratios; its stationarity condition
w_i gamma_i c_i p_i^-(gamma_i+1) = lambda (c_i the bracket above, or 1 for the normalised losses
L_i(p_i) / L_i(1)) is solved by bisection on lambda.

    params = fit(rows)                      # {family: {E, A, alpha, B, beta, gamma}}, .rmse, .ci
    ratios = optimal_ratios(params, N=1e9, D=1e11)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping

import numpy as np
from scipy import stats
from scipy.optimize import minimize

from jaxlm.errors import ScalingError
from jaxlm.scaling import fitting

PARAMS = ("E", "A", "alpha", "B", "beta", "gamma")
COLUMNS = ("family", "N", "D", "p", "loss")
MIN_ROWS = len(PARAMS) + 1
# Chinchilla's grid of initialisations (App. D.2) for log E, log A, alpha, log B, beta. gamma starts at
# a linear-regression estimate instead: log L = log c(N, D) - gamma log p is additive in log p.
INIT_GRID = fitting.grid(e=[-1, -0.5, 0, 0.5, 1, 1.5], a=[0, 5, 10, 15, 20, 25], alpha=[0, 0.5, 1, 1.5, 2],
                         b=[0, 5, 10, 15, 20, 25], beta=[0, 0.5, 1, 1.5, 2])
BOUNDS = [(None, None), (None, None), (0.0, 10.0), (None, None), (0.0, 10.0), (None, None)]


class FamilyFit(dict):
    """The fitted law of one family: a dict of E, A, alpha, B, beta, gamma.

    Attributes: `rmse` (root-mean-square residual of log-loss), `ci` ({name: (low, high)} percentile
    bootstrap intervals; empty when bootstrap=0), `n_rows`, `huber` (the minimised Huber objective).
    """

    def __init__(self, values, rmse: float = math.nan, ci=None, n_rows: int = 0, huber: float = math.nan):
        super().__init__(values)
        self.rmse, self.ci, self.n_rows, self.huber = rmse, dict(ci or {}), n_rows, huber


# ----------------------------------------------------------------------------- the law
def law(N, D, p, E, A, alpha, B, beta, gamma):
    """L(N, D, p) = (E + A N^-alpha + B D^-beta) p^-gamma, broadcast over numpy arrays."""
    N, D, p = (np.asarray(x, float) for x in (N, D, p))
    return (E + A * N ** -alpha + B * D ** -beta) * p ** -gamma


def predict(params: Mapping, N, D, p):
    """`law` with the parameters taken from a mapping (e.g. one family of `fit`'s result)."""
    return law(N, D, p, *(params[k] for k in PARAMS))


def _log_model(lN, lD, lp):
    """predict(theta, jac) for fitting.fit_huber; theta = (log E, log A, alpha, log B, beta, gamma)."""

    def model(theta, jac):
        t = np.asarray(theta, float)[..., None]
        e, a, alpha, b, beta, gamma = (t[..., k, :] for k in range(6))
        t1, t2 = a - alpha * lN, b - beta * lD
        logc = np.logaddexp(np.logaddexp(e, t1), t2)
        pred = logc - gamma * lp
        if not jac:
            return pred
        w0, w1, w2 = np.exp(e - logc), np.exp(t1 - logc), np.exp(t2 - logc)
        ones = np.ones_like(pred)
        return pred, np.stack([w0 * ones, w1, -lN * w1, w2, -lD * w2, -lp * ones], axis=-1)

    return model


def _gamma_guess(X) -> float:
    design = np.column_stack([np.ones_like(X["p"]), X["N"], X["D"], X["p"]])
    coef = np.linalg.lstsq(design, X["loss"], rcond=None)[0]
    return float(-coef[3])


def _theta_to_params(theta) -> dict:
    e, a, alpha, b, beta, gamma = (float(x) for x in theta)
    return {"E": math.exp(e), "A": math.exp(a), "alpha": alpha, "B": math.exp(b), "beta": beta, "gamma": gamma}


# ----------------------------------------------------------------------------- fitting
def records(rows: Iterable, source: str = "rows") -> list[dict]:
    """Validated rows: family, N > 0, D > 0, p in (0, 1], loss > 0 (errors name the row)."""
    recs = fitting.as_records(rows, numeric=COLUMNS[1:], strings=("family",), source=source)
    for col in ("N", "D", "loss"):
        fitting.require(recs, col)
    fitting.require(recs, "p", 0.0, 1.0, what=" (a sampling ratio)")
    return recs


def fit(rows: Iterable, delta: float = fitting.HUBER_DELTA, bootstrap: int = 100, level: float = 0.95,
        seed: int = 0, n_starts: int = 8) -> dict[str, FamilyFit]:
    """Fit the multilingual law separately for every language family.

    Args:
      rows: dicts with `family, N, D, p, loss` (extra keys ignored), e.g. `fitting.read_table(path)`.
      delta: Huber threshold on log-loss residuals (Chinchilla: 1e-3).
      bootstrap: resamples for the confidence intervals (0: none); each refit warm-starts at the fit.
      level: two-sided confidence level of the intervals.
      seed: seed of the resampling.
      n_starts: L-BFGS runs, from the best points of the initialisation grid.

    Returns:
      {family: FamilyFit} -- a dict of E, A, alpha, B, beta, gamma with `.rmse` and `.ci`.

    Raises:
      ScalingError: a row is malformed, or a family has too few rows or too few distinct N, D or p
        to identify the law.
    """
    by_family = defaultdict(list)
    for r in records(rows):
        by_family[r["family"]].append(r)
    out = {}
    for family, recs in sorted(by_family.items()):
        if len(recs) < MIN_ROWS:
            raise ScalingError(f"family {family!r}: {len(recs)} rows, need at least {MIN_ROWS} "
                               f"to fit {len(PARAMS)} parameters")
        for col in ("N", "D", "p"):
            if len({r[col] for r in recs}) < 2:
                raise ScalingError(f"family {family!r}: every row has the same {col}; need at least two "
                                   f"distinct values of N, D and p")
        X = {c: np.log([r[c] for r in recs]) for c in ("N", "D", "p", "loss")}
        model = _log_model(X["N"], X["D"], X["p"])
        inits = np.column_stack([INIT_GRID, np.full(len(INIT_GRID), _gamma_guess(X))])
        theta, value = fitting.fit_huber(model, X["loss"], inits, delta, n_starts, BOUNDS)
        residual = model(theta, False) - X["loss"]

        def refit(idx, theta=theta, X=X):
            sub = _log_model(X["N"][idx], X["D"][idx], X["p"][idx])
            try:
                return fitting.fit_huber(sub, X["loss"][idx], theta[None], delta, 1, BOUNDS)[0]
            except ScalingError:  # a diverged resample is left out of the percentiles
                return np.full(len(theta), np.nan)

        ci = {}
        if bootstrap > 0:
            draws = fitting.bootstrap(refit, len(recs), bootstrap, seed)
            draws[:, [0, 1, 3]] = np.exp(draws[:, [0, 1, 3]])
            ci = dict(zip(PARAMS, fitting.percentile_ci(draws, level)))
        out[family] = FamilyFit(_theta_to_params(theta), rmse=fitting.rmse(residual), ci=ci,
                                n_rows=len(recs), huber=value)
    return out


# ----------------------------------------------------------------------------- optimal ratios
def _coefficients(params, N, D, weights, normalized):
    families = list(params)
    if not families:
        raise ScalingError("no families to choose ratios for")
    weights = {f: 1.0 for f in families} if weights is None else dict(weights)
    unknown = set(weights) - set(families)
    if unknown:
        raise ScalingError(f"weights name unknown families {sorted(unknown)} (fitted: {families})")
    w = np.array([float(weights.get(f, 0.0)) for f in families])
    if np.any(w < 0) or not np.any(w > 0):
        raise ScalingError("weights must be >= 0 with at least one > 0")
    gamma = np.array([float(params[f]["gamma"]) for f in families])
    if normalized:
        c = np.ones(len(families))  # L_i(p) / L_i(1) = p^-gamma
    else:
        if N is None or D is None or not (N > 0 and D > 0):
            raise ScalingError(f"optimal ratios of the raw losses need N > 0 and D > 0, got N={N}, D={D}")
        c = np.array([float(predict(params[f], N, D, 1.0)) for f in families])
        if not np.all(np.isfinite(c)) or np.any(c <= 0):
            raise ScalingError(f"the laws give non-positive loss at N={N:g}, D={D:g}")
    return families, w * c, gamma


def optimal_ratios(params: Mapping[str, Mapping], N: float | None = None, D: float | None = None,
                   weights=None, normalized: bool = False, p_min: float = 0.0,
                   method: str = "bisection") -> dict[str, float]:
    """Sampling ratios minimising sum_i w_i L_i(N, D, p_i) subject to sum p_i = 1, p_i >= p_min.

    Args:
      params: {family: {E, A, alpha, B, beta, gamma}}, e.g. the result of `fit`.
      N, D: model size and total training tokens (needed for raw losses; unused when `normalized`).
      weights: {family: w_i}; None weighs every family 1. Families left out weigh 0.
      normalized: minimise sum_i w_i L_i(p_i) / L_i(1) instead, which trades relative losses and does
        not depend on N and D.
      p_min: floor for every ratio (a family must be sampled at least this much).
      method: "bisection" solves the stationarity condition w_i gamma_i c_i p_i^-(gamma_i+1) = lambda
        (c_i = E_i + A_i N^-alpha_i + B_i D^-beta_i, or 1 when normalised) for lambda, clamping ratios
        that fall below p_min (the KKT conditions); "numeric" runs SLSQP on the objective instead.

    Returns:
      {family: p_i}, summing to 1.
    """
    families, k, gamma = _coefficients(params, N, D, weights, normalized)
    n = len(families)
    if not 0.0 <= p_min or n * p_min > 1.0 + 1e-12:
        raise ScalingError(f"p_min={p_min:g} is infeasible for {n} families (need 0 <= p_min <= 1/{n})")
    active = (gamma > 0) & (k > 0)  # other families gain nothing from data: they get the floor
    if not np.any(active):
        raise ScalingError("no family with weight > 0 has gamma > 0: every mixture is equally good")
    if method == "bisection":
        p = _bisect(k, gamma, active, p_min)
    elif method == "numeric":
        p = _numeric(k, gamma, p_min)
    else:
        raise ScalingError(f"unknown method {method!r} (bisection | numeric)")
    return {f: float(x) for f, x in zip(families, p)}


def _bisect(k, gamma, active, p_min):
    logkg = np.log(np.where(active, k * np.where(active, gamma, 1.0), 1.0))

    def ratios(log_lam):
        p = np.exp((logkg - log_lam) / (gamma + 1.0), where=active, out=np.zeros_like(k))
        return np.maximum(p, p_min)

    lo = logkg[active].min()  # every active ratio >= 1: sum >= 1
    hi = (logkg + 60.0 * (gamma + 1.0))[active].max()  # every active ratio <= e^-60
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ratios(mid).sum() > 1.0 else (lo, mid)
    p = ratios(0.5 * (lo + hi))
    return p / p.sum()


def _numeric(k, gamma, p_min):
    lo = max(p_min, 1e-9)
    res = minimize(lambda p: float(np.sum(k * p ** -gamma)), np.full(len(k), 1.0 / len(k)),
                   jac=lambda p: -k * gamma * p ** (-gamma - 1.0), method="SLSQP",
                   bounds=[(lo, 1.0)] * len(k),
                   constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1.0, "jac": lambda p: np.ones_like(p)}],
                   options={"ftol": 1e-15, "maxiter": 1000})
    return res.x / res.x.sum()


# ----------------------------------------------------------------------------- independence
def _mixture_key(row, columns):
    if columns is not None:
        return tuple(row.get(c) for c in columns)
    if "mixture" in row:
        return row["mixture"]
    key = tuple(sorted((k, v) for k, v in row.items() if k.startswith("p_")))
    if not key:
        raise ScalingError(f"{row['_where']}: the independence check needs a 'mixture' column or "
                           f"p_<family> columns with the other families' ratios")
    return key


def independence_check(rows: Iterable, family: str, noise: float | None = None, level: float = 0.05,
                       mixture_columns=None) -> dict:
    """Does family i's loss depend on the other families' ratios once its own ratio p_i is fixed?

    Rows of `family` are grouped into cells of equal (N, D, p); within a cell, runs differ only in the
    rest of the mixture (a `mixture` id, or the `p_*` columns, or `mixture_columns`). The spread of
    mean log-loss across mixtures within cells (sum of squares SS_b, df_b = sum of mixtures - 1) is
    compared with the noise:
      * replicates (several runs of one mixture in a cell): F = (SS_b/df_b) / (SS_w/df_w), F test;
      * otherwise `noise`, the standard deviation of log-loss (e.g. `fit(...)[family].rmse`):
        chi2 = SS_b / noise^2 against chi2(df_b).
    The law's independence holds ("independent") unless the p-value falls below `level`.

    Returns:
      {"family", "verdict", "test", "statistic", "threshold", "p_value", "df", "noise", "noise_source",
       "max_spread" (largest relative loss range across mixtures in a cell), "cells"}.
    """
    recs = [r for r in records(rows) if r["family"] == family]
    if not recs:
        raise ScalingError(f"no rows of family {family!r}")
    cells = defaultdict(lambda: defaultdict(list))
    for r in recs:
        cells[(r["N"], r["D"], r["p"])][_mixture_key(r, mixture_columns)].append(math.log(r["loss"]))
    ss_b = ss_w = 0.0
    df_b = df_w = n_cells = 0
    spread = 0.0
    for mixtures in cells.values():
        groups = [np.array(v) for v in mixtures.values()]
        ss_w += sum(float(np.sum((g - g.mean()) ** 2)) for g in groups)
        df_w += sum(len(g) - 1 for g in groups)
        if len(groups) < 2:
            continue
        grand = np.concatenate(groups).mean()
        means = np.array([g.mean() for g in groups])
        ss_b += float(sum(len(g) * (m - grand) ** 2 for g, m in zip(groups, means)))
        df_b += len(groups) - 1
        n_cells += 1
        spread = max(spread, float(np.exp(means.max() - means.min()) - 1.0))
    if df_b == 0:
        raise ScalingError(f"family {family!r}: no (N, D, p) cell has runs with two different mixtures")
    if noise is None and df_w > 0:
        sigma2 = max(ss_w / df_w, 1e-300)
        stat = (ss_b / df_b) / sigma2
        test, df = "F", (df_b, df_w)
        p_value, threshold = float(stats.f.sf(stat, *df)), float(stats.f.ppf(1 - level, *df))
        source = f"replicates ({df_w} df)"
    elif noise is not None:
        if not noise > 0:
            raise ScalingError(f"noise must be > 0, got {noise}")
        sigma2 = noise**2
        stat = ss_b / sigma2
        test, df = "chi2", (df_b,)
        p_value, threshold = float(stats.chi2.sf(stat, df_b)), float(stats.chi2.ppf(1 - level, df_b))
        source = "given noise"
    else:
        raise ScalingError(f"family {family!r}: no replicate runs to estimate the noise; pass noise= "
                           f"(e.g. the fit's rmse)")
    return {"family": family, "verdict": "dependent" if p_value < level else "independent", "test": test,
            "statistic": float(stat), "threshold": threshold, "p_value": p_value, "df": df,
            "noise": math.sqrt(sigma2), "noise_source": source, "max_spread": spread, "cells": n_cells}
