"""PNG plots of the scaling-law fits.

matplotlib is optional (`pip install jaxlm[plot]`) and imported only when a plot is drawn. Figures are
drawn on an Agg canvas directly, never through pyplot, so a plot neither needs a display nor changes
the caller's matplotlib backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from jaxlm.errors import ScalingError
from jaxlm.scaling import lr_horizon, multilingual


def _figure(width, height):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ScalingError("plotting needs matplotlib: pip install 'jaxlm[plot]'") from e
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> Path:
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        raise ScalingError(f"{path}: folder {path.parent} does not exist")
    fig.savefig(path, dpi=110)
    return path


def plot_multilingual(rows, params: dict, path) -> Path:
    """Observed against fitted loss, one panel per family, points coloured by the sampling ratio p."""
    recs = multilingual.records(rows)
    families = list(params)
    cols = min(3, len(families))
    nrows = math.ceil(len(families) / cols)
    fig = _figure(4.2 * cols, 3.8 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, family in zip(axes, families):
        mine = [r for r in recs if r["family"] == family]
        observed = np.array([r["loss"] for r in mine])
        fitted = multilingual.predict(params[family], *(np.array([r[c] for r in mine]) for c in ("N", "D", "p")))
        dots = ax.scatter(observed, fitted, c=[r["p"] for r in mine], cmap="viridis", s=14,
                          norm=_log_norm([r["p"] for r in mine]))
        lo, hi = min(observed.min(), fitted.min()), max(observed.max(), fitted.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
        ax.set(xlabel="observed loss", ylabel="fitted loss")
        p = params[family]
        rmse = getattr(p, "rmse", math.nan)
        ax.set_title(f"{family}: alpha={p['alpha']:.3f} beta={p['beta']:.3f} gamma={p['gamma']:.3f}\n"
                     f"RMSE(log loss)={rmse:.4f}", fontsize=9)
        fig.colorbar(dots, ax=ax, label="p")
    for ax in axes[len(families):]:
        ax.set_visible(False)
    return _save(fig, path)


def _log_norm(values):
    from matplotlib.colors import LogNorm

    lo, hi = min(values), max(values)
    return LogNorm(lo, hi if hi > lo else lo * 1.0001)


def plot_lr_horizon(rows, result: dict, path) -> Path:
    """Left: loss against LR per horizon with the fitted parabolas (dashed: dropped horizons).
    Right: LR* against D with the fitted power law of every model size."""
    recs = [r for r in (rows if isinstance(rows, list) else list(rows))]
    fig = _figure(11, 4.5)
    left, right = fig.subplots(1, 2)
    parabolas = result["parabolas"]
    colours = _colours(len(parabolas))
    for colour, ((n, d), v) in zip(colours, parabolas.items()):
        mine = [r for r in recs if float(r["D"]) == d and (n is None or float(r["N"]) == n)]
        label = f"D={d:.3g}" if n is None else f"N={n:.3g} D={d:.3g}"
        left.scatter([float(r["lr"]) for r in mine], [float(r["loss"]) for r in mine], s=12, color=colour)
        if math.isfinite(v["a"]):
            x = np.linspace(*np.log(v["lr_range"]), 100)
            left.plot(np.exp(x), v["a"] * x * x + v["b"] * x + v["c"], color=colour, ls="-" if v["ok"] else "--",
                      label=label if v["ok"] else label + " (dropped)")
        if v["ok"]:
            left.scatter([v["lr_star"]], [v["loss_star"]], marker="*", s=80, color=colour, edgecolor="black")
    left.set(xscale="log", xlabel="learning rate", ylabel="final loss", title="loss vs LR per horizon")
    left.legend(fontsize=7)

    sizes = result["per_size"] or {result["N"]: result}
    for colour, (n, fit) in zip(_colours(len(sizes)), sizes.items()):
        D = np.array(sorted(fit["per_horizon"]))
        right.scatter(D, [fit["per_horizon"][d] for d in D], color=colour)
        grid = np.geomspace(D.min(), D.max(), 50)
        tag = "" if n is None else f"N={n:.3g}: "
        right.plot(grid, lr_horizon.lr_star(grid, fit["B"], fit["beta"]), color=colour,
                   label=f"{tag}LR*={fit['B']:.3g} D^-{fit['beta']:.3f}")
    right.set(xscale="log", yscale="log", xlabel="training tokens D", ylabel="LR*", title="optimal LR vs horizon")
    right.legend(fontsize=8)
    return _save(fig, path)


def _colours(n):
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1) * 0.9) for i in range(n)]
