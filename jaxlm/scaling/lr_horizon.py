"""Optimal learning rate across token horizons (Bjorck et al., 2024).

The loss-minimising learning rate falls as a power of the training horizon D (tokens),

    LR*(D) = B * D^-beta            (beta ~ 0.32 at the larger sizes in the paper)
    LR*(N, D) = C * N^-alpha * D^-beta

and the rule of thumb LR(D) = LR(D0) * (D / D0)^-beta carries a tuned learning rate to a new horizon.
Fitting: for every horizon, the final loss is fitted as a quadratic in log LR and the vertex is LR*(D);
then log LR* is regressed on log D (and log N). Horizons whose parabola has no minimum inside the
sampled learning rates are dropped with a warning.

    result = fit(rows)              # rows: dicts with D, lr, loss (and N for the joint fit)
    result["beta"], result["per_horizon"]
    lr_for_horizon(3e-3, 1e10, 1e11)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import numpy as np
from scipy import stats

from jaxlm.errors import ScalingError
from jaxlm.scaling import fitting

COLUMNS = ("D", "lr", "loss")
BETA = 0.32  # Bjorck et al.'s exponent at the larger model sizes


# ----------------------------------------------------------------------------- laws
def lr_star(D, B, beta):
    """LR*(D) = B D^-beta, broadcast over numpy arrays."""
    return B * np.asarray(D, float) ** -beta


def joint_lr_star(N, D, C, alpha, beta):
    """LR*(N, D) = C N^-alpha D^-beta, broadcast over numpy arrays."""
    return C * np.asarray(N, float) ** -alpha * np.asarray(D, float) ** -beta


def lr_for_horizon(lr0, d0, d, beta: float = BETA):
    """Learning rate for horizon `d` given a good one, `lr0`, at horizon `d0`: lr0 (d / d0)^-beta.

    Vectorised over numpy arrays; returns a float for scalar input.
    """
    lr0, d0, d = (np.asarray(x, float) for x in (lr0, d0, d))
    for name, x in (("lr0", lr0), ("d0", d0), ("d", d)):
        if not np.all(np.isfinite(x) & (x > 0)):
            raise ScalingError(f"lr_for_horizon: {name} must be finite and > 0, got {x}")
    out = lr0 * (d / d0) ** -beta
    return float(out) if out.ndim == 0 else out


def lr_at(result: dict, D, N=None):
    """LR* at horizon D from `fit`'s result: the joint law when N is given and fitted, else B D^-beta."""
    if N is not None:
        if not result.get("joint"):
            raise ScalingError("no joint (N, D) fit in this result: give D only")
        j = result["joint"]
        return joint_lr_star(N, D, j["C"], j["alpha"], j["beta"])
    return lr_star(D, result["B"], result["beta"])


# ----------------------------------------------------------------------------- per horizon
def quadratic_vertex(lr, loss) -> dict:
    """Fit loss = a x^2 + b x + c with x = ln(lr); the vertex exp(-b / 2a) is LR*.

    Returns {"a", "b", "c", "lr_star", "loss_star", "lr_range", "ok", "reason"}: `ok` is False (with
    the `reason`) when there are fewer than 3 learning rates, the parabola opens downward, or the vertex
    lies outside the sampled range (then LR* is an extrapolation and the sweep should be extended).
    """
    x, y = np.log(np.asarray(lr, float)), np.asarray(loss, float)
    lo, hi = float(np.exp(x.min())), float(np.exp(x.max()))
    out = {"a": math.nan, "b": math.nan, "c": math.nan, "lr_star": math.nan, "loss_star": math.nan,
           "lr_range": (lo, hi), "ok": False, "reason": ""}
    if len(np.unique(x)) < 3:
        out["reason"] = f"{len(np.unique(x))} distinct learning rates; a parabola needs at least 3"
        return out
    a, b, c = np.polyfit(x - x.mean(), y, 2)  # centred for conditioning
    b, c = b - 2 * a * x.mean(), c - b * x.mean() + a * x.mean() ** 2
    out.update(a=float(a), b=float(b), c=float(c))
    if not a > 0:
        out["reason"] = "the loss-vs-log-LR parabola opens downward (no minimum)"
        return out
    xv = -b / (2 * a)
    out.update(lr_star=float(np.exp(xv)), loss_star=float(c - b * b / (4 * a)))
    if not x.min() <= xv <= x.max():
        out["reason"] = (f"the vertex LR*={np.exp(xv):.3g} lies outside the sampled learning rates "
                         f"[{lo:.3g}, {hi:.3g}]; extend the sweep")
        return out
    out["ok"] = True
    return out


def _regress(y, columns, level):
    """OLS of y on [1, *columns]: (coefficients, (low, high) per coefficient or None when no dof)."""
    X = np.column_stack([np.ones_like(y)] + list(columns))
    coef, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(y) - X.shape[1]
    if dof < 1:
        return coef, None
    sigma2 = float(np.sum((y - X @ coef) ** 2)) / dof
    se = np.sqrt(np.diag(np.linalg.inv(X.T @ X)) * sigma2)
    t = stats.t.ppf(0.5 + level / 2, dof)
    return coef, [(float(c - t * s), float(c + t * s)) for c, s in zip(coef, se)]


def _power_law(horizons: dict, level: float) -> dict:
    D = np.array(sorted(horizons))
    y = np.log([horizons[d] for d in D])
    coef, ci = _regress(y, [np.log(D)], level)
    out = {"B": float(np.exp(coef[0])), "beta": float(-coef[1]), "per_horizon": {float(d): horizons[d] for d in D}}
    out["ci"] = {} if ci is None else {"B": (math.exp(ci[0][0]), math.exp(ci[0][1])),
                                       "beta": (-ci[1][1], -ci[1][0])}
    return out


# ----------------------------------------------------------------------------- fit
def fit(rows: Iterable, level: float = 0.95) -> dict:
    """Fit LR*(D) = B D^-beta (and LR*(N, D) = C N^-alpha D^-beta when rows carry N).

    Args:
      rows: dicts with `D` (tokens), `lr`, `loss` (final loss of that run) and optionally `N`.
      level: two-sided level of the confidence intervals (from the regression's standard errors;
        they need at least 3 horizons, or 4 (N, D) points for the joint fit).

    Returns a dict:
      B, beta, ci ({"B": (lo, hi), "beta": (lo, hi)}, empty with 2 horizons), per_horizon ({D: LR*}):
        the power law of the largest model size that has at least 2 usable horizons (of all rows
        when there is no N);
      N: that size (None without N); per_size: {N: {B, beta, ci, per_horizon}} for every size with
        at least 2 usable horizons; joint: {C, alpha, beta, ci} or None; parabolas:
        {(N, D): quadratic_vertex(...)} for every horizon (N None without N); warnings: [str].

    Raises:
      ScalingError: a malformed row, non-positive D, lr or loss, or fewer than 2 usable horizons.
    """
    recs = fitting.as_records(rows, numeric=COLUMNS, optional=("N",))
    for col in COLUMNS:
        fitting.require(recs, col)
    with_n = ["N" in r for r in recs]
    if any(with_n) and not all(with_n):
        bad = recs[with_n.index(False)]["_where"]
        raise ScalingError(f"{bad}: column 'N' is missing here but present on other rows")
    if all(with_n):
        fitting.require(recs, "N")
    groups = defaultdict(list)
    for r in recs:
        groups[(r.get("N"), r["D"])].append(r)

    warnings, parabolas = [], {}
    for (n, d), g in sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1])):
        v = quadratic_vertex([r["lr"] for r in g], [r["loss"] for r in g])
        parabolas[(n, d)] = v
        if not v["ok"]:
            warnings.append(f"{'' if n is None else f'N={n:g}, '}D={d:g}: dropped, {v['reason']}")

    sizes = sorted({n for n, _ in parabolas}, key=lambda n: n or 0)
    per_size = {}
    for n in sizes:
        good = {d: v["lr_star"] for (m, d), v in parabolas.items() if m == n and v["ok"]}
        label = "" if n is None else f"N={n:g}: "
        if len(good) < 2:
            if n is not None:
                warnings.append(f"{label}{len(good)} usable horizon(s); no power law for this size")
            continue
        per_size[n] = _power_law(good, level)
        if not per_size[n]["ci"]:
            warnings.append(f"{label}only 2 usable horizons: no confidence interval for beta")
    if not per_size:
        usable = sum(v["ok"] for v in parabolas.values())
        raise ScalingError(f"need at least 2 usable horizons (distinct D with a minimum inside the sampled "
                           f"learning rates) for one model size, got {usable} of {len(parabolas)}"
                           + "".join(f"\n  {w}" for w in warnings))
    top_n = max(per_size, key=lambda n: n or 0)
    out = dict(per_size[top_n], N=top_n, per_size=per_size if top_n is not None else {},
               joint=None, parabolas=parabolas, warnings=warnings)
    if top_n is not None:
        out["joint"] = _joint(parabolas, level, warnings)
    return out


def _joint(parabolas, level, warnings):
    pts = [(n, d, v["lr_star"]) for (n, d), v in parabolas.items() if v["ok"]]
    if len({p[0] for p in pts}) < 2 or len({p[1] for p in pts}) < 2 or len(pts) < 3:
        if len({n for n, _ in parabolas}) >= 2:
            warnings.append("joint (N, D) fit skipped: needs usable horizons at 2+ sizes and 2+ distinct D")
        return None
    N, D, lr = (np.array(c, float) for c in zip(*pts))
    coef, ci = _regress(np.log(lr), [np.log(N), np.log(D)], level)
    out = {"C": float(np.exp(coef[0])), "alpha": float(-coef[1]), "beta": float(-coef[2]), "ci": {}}
    if ci is None:
        warnings.append("joint (N, D) fit has 3 points: no confidence interval")
    else:
        out["ci"] = {"C": (math.exp(ci[0][0]), math.exp(ci[0][1])), "alpha": (-ci[1][1], -ci[1][0]),
                     "beta": (-ci[2][1], -ci[2][0])}
    return out
