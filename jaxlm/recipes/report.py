"""What the recipes' reports share: rates with binomial confidence intervals, markdown tables, bar
charts written next to them (report.md + PNG in the run directory)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion k/n (95% by default); (0, 1) when n is 0."""
    if n == 0:
        return 0.0, 1.0
    if k in (0, n):  # closed form at the edges (the general one gives 0.9999999999999999 for 6/6)
        far = (z * z / n) / (1 + z * z / n)
        return (0.0, far) if k == 0 else (1.0 - far, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def rate(k: int, n: int) -> str:
    """'41.2% [35.1, 47.6] (40/97)': the rate, its 95% Wilson interval and the counts behind it."""
    if n == 0:
        return "- (0/0)"
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}] ({k}/{n})"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    def cell(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def bar_chart(path, groups: Sequence[str], series: dict[str, Sequence[float]], *, ylabel: str, title: str,
              errors: dict[str, Sequence[tuple[float, float]]] | None = None) -> Path:
    """Grouped bars: one group per entry of `groups`, one bar per series (with optional [lo, hi] error bars)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6, 1.6 * len(groups) * max(1, len(series)) / 2), 4))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    x = np.arange(len(groups))
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        yerr = None
        if errors and name in errors:
            lo, hi = np.array(errors[name]).T
            yerr = np.maximum([np.asarray(values) - lo, hi - np.asarray(values)], 0.0)  # no rounding below 0
        ax.bar(x + i * width - 0.4 + width / 2, values, width, label=name, yerr=yerr, capsize=3)
    ax.set_xticks(x, groups)
    ax.set(ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
