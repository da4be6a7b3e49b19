"""`jaxlm fit ...`: fit a scaling law to a results table, print it as tables, and plot it.

    jaxlm fit multilingual RESULTS [--plot out.png] [--N ..] [--D ..] [--weights en=1,zh=2]
                                   [--normalized] [--p-min ..]
    jaxlm fit lr-horizon RESULTS [--plot out.png] [--horizon D ...]

Bad input raises `ScalingError` with the file, line and column.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from jaxlm.cli.common import console, out
from jaxlm.errors import ScalingError
from jaxlm.scaling import fitting, lr_horizon, multilingual, plots


def _fmt(x) -> str:
    return f"{x:.4g}"


def _with_ci(value, ci, sep=" ") -> str:
    return _fmt(value) + (f"{sep}[{_fmt(ci[0])}, {_fmt(ci[1])}]" if ci else "")


def _parse_weights(text):
    if not text:
        return None
    weights = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        try:
            if not sep or not name.strip():
                raise ValueError
            weights[name.strip()] = float(value)
        except ValueError:
            raise ScalingError(f"--weights: {item!r} is not FAMILY=NUMBER (e.g. --weights en=1,zh=2)") from None
    return weights


def _plot(draw, args, default: Path, err):
    """Write the plot to --plot, or beside RESULTS unless --no-plot; a missing matplotlib only
    warns when the user did not ask for a plot by name."""
    if args.no_plot:
        return
    path = Path(args.plot) if args.plot else default
    try:
        draw(path)
    except ScalingError as e:
        if args.plot or "matplotlib" not in str(e):
            raise
        err.print(f"[yellow]no plot:[/yellow] {escape(str(e))}")
        return
    err.print(f"wrote {path}")


# ----------------------------------------------------------------------------- multilingual
def cmd_multilingual(args, extra=None):
    err = console
    weights = _parse_weights(args.weights)
    rows = fitting.read_table(args.results, required=multilingual.COLUMNS)
    recs = multilingual.records(rows)
    params = multilingual.fit(recs, bootstrap=args.bootstrap, seed=args.seed)

    ci = f", 95% CI from {args.bootstrap} bootstrap resamples" if args.bootstrap else ""
    table = Table("", *params, title=f"L = (E + A N^-alpha + B D^-beta) p^-gamma{ci}")
    for k in multilingual.PARAMS:  # one column per family keeps the table narrow
        table.add_row(k, *(_with_ci(p[k], p.ci.get(k), "\n") for p in params.values()))
    table.add_row("RMSE(log)", *(f"{p.rmse:.4f}" for p in params.values()))
    table.add_row("rows", *(str(p.n_rows) for p in params.values()))
    out.print(table)

    N = args.N if args.N is not None else max(r["N"] for r in recs)
    D = args.D if args.D is not None else max(r["D"] for r in recs)
    ratios = multilingual.optimal_ratios(params, N, D, weights=weights, normalized=args.normalized,
                                         p_min=args.p_min)
    kind = "L_i(p)/L_i(1)" if args.normalized else "L_i(p)"
    table = Table("family", "weight", "optimal p", "loss at p", "loss at p=1",
                  title=f"optimal sampling ratios: min sum w_i {kind} at N={N:.3g}, D={D:.3g}, p_min={args.p_min:g}")
    for family, p in ratios.items():
        w = 1.0 if weights is None else weights.get(family, 0.0)
        table.add_row(family, f"{w:g}", f"{p:.4f}", _fmt(float(multilingual.predict(params[family], N, D, p))),
                      _fmt(float(multilingual.predict(params[family], N, D, 1.0))))
    out.print(table)

    if any("mixture" in r or any(k.startswith("p_") for k in r) for r in recs):
        table = Table("family", "verdict", "test", "statistic", "threshold", "p-value", "noise",
                      title="does a family's loss depend on the other families' ratios?")
        for family, p in params.items():
            try:
                v = multilingual.independence_check(recs, family, noise=None)
            except ScalingError:
                try:
                    v = multilingual.independence_check(recs, family, noise=p.rmse)
                except ScalingError:
                    continue
            table.add_row(family, v["verdict"], v["test"], _fmt(v["statistic"]), _fmt(v["threshold"]),
                          _fmt(v["p_value"]), f"{v['noise_source']}: {v['noise']:.4f}")
        if table.row_count:
            out.print(table)

    _plot(lambda path: plots.plot_multilingual(recs, params, path), args,
          Path(args.results).with_suffix(".multilingual.png"), err)
    return 0


# ----------------------------------------------------------------------------- lr horizon
def cmd_lr_horizon(args, extra=None):
    err = console
    rows = fitting.read_table(args.results, required=lr_horizon.COLUMNS)
    result = lr_horizon.fit(rows)

    table = Table("N", "D", "LR*", "loss at LR*", "sampled LRs", "status", title="quadratic in log LR per horizon")
    for (n, d), v in result["parabolas"].items():
        table.add_row("-" if n is None else _fmt(n), _fmt(d), _fmt(v["lr_star"]), _fmt(v["loss_star"]),
                      f"{_fmt(v['lr_range'][0])}..{_fmt(v['lr_range'][1])}",
                      "ok" if v["ok"] else f"[yellow]dropped[/yellow]: {escape(v['reason'])}")
    out.print(table)

    table = Table("N", "B", "beta", "horizons", title="LR*(D) = B D^-beta (95% CI)")
    for n, fit in (result["per_size"] or {None: result}).items():
        table.add_row("-" if n is None else _fmt(n), _with_ci(fit["B"], fit["ci"].get("B")),
                      _with_ci(fit["beta"], fit["ci"].get("beta")), str(len(fit["per_horizon"])))
    out.print(table)
    if result["joint"]:
        j = result["joint"]
        table = Table("C", "alpha", "beta", title="LR*(N, D) = C N^-alpha D^-beta (95% CI)")
        table.add_row(*(_with_ci(j[k], j["ci"].get(k)) for k in ("C", "alpha", "beta")))
        out.print(table)
    if args.horizon:
        size = "" if result["N"] is None else f" of N={result['N']:.3g}"
        table = Table("D", "LR*", title=f"predicted LR* (power law{size})")
        for d in args.horizon:
            table.add_row(_fmt(d), _fmt(float(lr_horizon.lr_at(result, d))))
        out.print(table)
    for w in result["warnings"]:
        err.print(f"[yellow]warning:[/yellow] {escape(w)}")

    _plot(lambda path: plots.plot_lr_horizon(rows, result, path), args,
          Path(args.results).with_suffix(".lr_horizon.png"), err)
    return 0


# ----------------------------------------------------------------------------- parser
def _positive(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return x


def _common(p):
    p.add_argument("results", metavar="RESULTS", help="results table: .csv (with a header) or .jsonl")
    p.add_argument("--plot", metavar="PNG", help="plot file (default: beside RESULTS, *.<law>.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write a plot")


def register(sub, name, help_text):
    """`fit multilingual` and `fit lr-horizon`: each prints rich tables to stdout, writes a PNG and
    raises `ScalingError` on bad input."""
    fit = sub.add_parser(name, help=help_text, description=__doc__.split("\n\n")[0])
    laws = fit.add_subparsers(dest="law", required=True, metavar="LAW")

    p = laws.add_parser("multilingual", help="multilingual law per language family; optimal sampling ratios",
                        description="Fit L_i(N, D, p_i) = (E_i + A_i N^-alpha_i + B_i D^-beta_i) p_i^-gamma_i "
                                    "per family (He et al., 2024) and print the optimal sampling ratios. "
                                    "RESULTS has columns family, N, D, p, loss (extra columns allowed; a "
                                    "'mixture' or p_<family> columns add an independence check).")
    _common(p)
    p.add_argument("--N", type=_positive, help="model size for the ratios (default: largest in RESULTS)")
    p.add_argument("--D", type=_positive, help="training tokens for the ratios (default: largest in RESULTS)")
    p.add_argument("--weights", metavar="F=W,..", help="per-family weights of the summed loss (default: equal)")
    p.add_argument("--normalized", action="store_true", help="minimise sum w_i L_i(p_i) / L_i(1) instead")
    p.add_argument("--p-min", type=float, default=0.0, help="lower bound on every ratio (default: 0)")
    p.add_argument("--bootstrap", type=int, default=100, help="bootstrap resamples for the CIs (0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(func=cmd_multilingual)

    p = laws.add_parser("lr-horizon", help="optimal learning rate across token horizons",
                        description="Fit the final loss as a quadratic in log LR per horizon, then "
                                    "LR*(D) = B D^-beta (Bjorck et al., 2024), and LR*(N, D) = C N^-alpha D^-beta "
                                    "when RESULTS has an N column. RESULTS has columns D, lr, loss [, N].")
    _common(p)
    p.add_argument("--horizon", type=_positive, action="append", metavar="D",
                   help="also print the predicted LR* at this horizon (repeatable)")
    p.set_defaults(func=cmd_lr_horizon)
