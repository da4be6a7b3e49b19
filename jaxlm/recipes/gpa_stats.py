"""What GPA's contrast stage computes: which preference items distinguish one group from the others
(log-odds with an informative Dirichlet prior, Monroe, Colaresi & Quinn 2008, "Fightin' Words"), and
how far apart the groups' item distributions are (Jensen-Shannon divergence). Pure functions of counts.

Log-odds, group i against the rest j, item w (y counts, n = sum of a side's counts, a_w the prior's
pseudo-count of w, a0 = sum of a_w):

    delta_w = log((y_iw + a_w) / (n_i + a0 - y_iw - a_w)) - log((y_jw + a_w) / (n_j + a0 - y_jw - a_w))
    var_w  ~= 1 / (y_iw + a_w) + 1 / (y_jw + a_w)
    z_w     = delta_w / sqrt(var_w)

The informative prior is a background distribution scaled to a total of a0 (`prior_strength`):
a_w = a0 * b_w / sum(b). GPA's background is the pooled counts of every group (so common items shrink
towards no difference and rare ones need more evidence).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np


def log_odds_z(counts_i: Mapping[str, float], counts_j: Mapping[str, float], prior: Mapping[str, float],
               prior_strength: float | None = None) -> dict[str, dict]:
    """{item: {delta, var, z, y_i, y_j, alpha}} for every item of the prior. `prior` holds background
    counts; with `prior_strength` (a0) they are rescaled to that total, else used as the pseudo-counts
    themselves. Items with a zero prior get none (they must have counts on both sides then)."""
    total = float(sum(prior.values()))
    if total <= 0:
        raise ValueError("log_odds_z: the prior has no mass")
    scale = (prior_strength / total) if prior_strength else 1.0
    alpha = {w: float(b) * scale for w, b in prior.items()}
    a0 = sum(alpha.values())
    n_i, n_j = float(sum(counts_i.values())), float(sum(counts_j.values()))
    out = {}
    for w, a in alpha.items():
        yi, yj = float(counts_i.get(w, 0)), float(counts_j.get(w, 0))
        if yi + a <= 0 or yj + a <= 0:
            continue
        delta = (math.log((yi + a) / (n_i + a0 - yi - a)) - math.log((yj + a) / (n_j + a0 - yj - a)))
        var = 1.0 / (yi + a) + 1.0 / (yj + a)
        out[w] = {"delta": delta, "var": var, "z": delta / math.sqrt(var), "y_i": yi, "y_j": yj, "alpha": a}
    return out


def distribution(counts: Mapping[str, float], support) -> np.ndarray:
    """Counts over `support` (in that order) as probabilities (all zeros stay zeros)."""
    v = np.array([float(counts.get(w, 0)) for w in support], dtype=np.float64)
    s = v.sum()
    return v / s if s > 0 else v


def js_divergence(p, q, base: float = 2.0) -> float:
    """Jensen-Shannon divergence of two distributions (normalised here): 1/2 KL(p||m) + 1/2 KL(q||m),
    m = (p + q) / 2; in [0, 1] with base 2, symmetric, 0 only when p = q."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape:
        raise ValueError("js_divergence: the distributions differ in support")
    if p.sum() <= 0 or q.sum() <= 0:
        raise ValueError("js_divergence: an empty distribution")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2

    def kl(a):
        nz = a > 0
        return float(np.sum(a[nz] * np.log(a[nz] / m[nz])))

    return (0.5 * kl(p) + 0.5 * kl(q)) / math.log(base)


def contrast(counts: Mapping[str, Mapping[str, float]], prior: Mapping[str, float],
             prior_strength: float | None) -> dict[str, dict[str, dict]]:
    """{group: log_odds_z(group, every other group pooled)} of per-group item counts."""
    out = {}
    for g, c in counts.items():
        rest: dict[str, float] = {}
        for h, ch in counts.items():
            if h != g:
                for w, y in ch.items():
                    rest[w] = rest.get(w, 0) + y
        out[g] = log_odds_z(c, rest, prior, prior_strength)
    return out


def js_summary(counts: Mapping[str, Mapping[str, float]]) -> dict:
    """Pairwise JS divergences (base 2) between the groups' item distributions; None for an empty group."""
    groups = sorted(counts)
    support = sorted({w for c in counts.values() for w in c})
    out = {}
    for a in range(len(groups)):
        for b in range(a + 1, len(groups)):
            p, q = distribution(counts[groups[a]], support), distribution(counts[groups[b]], support)
            out[f"{groups[a]}|{groups[b]}"] = js_divergence(p, q) if p.sum() and q.sum() else None
    return out
