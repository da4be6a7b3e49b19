"""The multilingual scaling law on real text at CPU scale: run the sweep, fit, and answer its two questions.

    python bench/multilingual_law.py [--family Germanic] [--no-run]

1. `jaxlm sweep run configs/sweeps/multilingual.py` (skips finished runs): 2 sizes x 2 token budgets x
   5 mixtures of Germanic, Romance and Slavic text from ../shared/data/multilingual, plus two seed
   replicates, each run evaluated per family on held-out text;
2. the law L_i(N, D, p_i) = (E + A N^-alpha + B D^-beta) p_i^-gamma fitted per family (Huber, L-BFGS,
   bootstrap intervals) - gamma is how steeply a family's loss falls with its own share;
3. independence: the family's held-out loss across mixtures that hold its share fixed and move the
   others', against the seed-to-seed noise (F test) and against the fit's residual (chi-square).

Prints the fitted law, the loss table behind the independence check, and one verdict line per question.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SWEEP = f"{ROOT / 'configs/sweeps/multilingual.py'}:{ROOT.parent / 'shared/data/multilingual'}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", default="Germanic", help="the family whose share the sweep varies")
    p.add_argument("--no-run", action="store_true", help="only fit the results already recorded")
    p.add_argument("--bootstrap", type=int, default=200)
    args = p.parse_args(argv)

    from jaxlm import sweep
    from jaxlm.scaling import fitting, multilingual

    s = sweep.load(SWEEP)
    results = ROOT / s.dir / "results.jsonl" if not Path(s.dir).is_absolute() else Path(s.dir) / "results.jsonl"
    if not args.no_run:
        rc = subprocess.call([sys.executable, "-m", "jaxlm.cli", "sweep", "run", str(SWEEP)], cwd=ROOT)
        if rc:
            return rc
    rows = fitting.read_table(results, multilingual.COLUMNS)
    fits = multilingual.fit(rows, bootstrap=args.bootstrap)

    print(f"\n{len(rows)} rows ({len({r['run'] for r in rows})} runs) from {results}")
    print("| family | E | A | alpha | B | beta | gamma (95% CI) | RMSE log-loss |\n|---|---|---|---|---|---|---|---|")
    for fam, f in fits.items():
        lo, hi = f.ci.get("gamma", (float("nan"),) * 2)
        print(f"| {fam} | {f['E']:.3g} | {f['A']:.3g} | {f['alpha']:.3g} | {f['B']:.3g} | {f['beta']:.3g} "
              f"| {f['gamma']:.3f} [{lo:.3f}, {hi:.3f}] | {f.rmse:.4f} |")

    fam = args.family
    cells = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if r["family"] == fam:
            cells[(r["N"], r["D"], r["p"])][r["mixture"]].append(r["loss"])
    print(f"\n{fam} held-out loss by mixture (cells with its share fixed and several mixtures)")
    print("| N | D | p | mixture | loss (runs) |\n|---|---|---|---|---|")
    for (n, d, share), mixes in sorted(cells.items()):
        if len(mixes) < 2:
            continue
        for mix, losses in sorted(mixes.items()):
            runs = ", ".join(f"{x:.4f}" for x in losses)
            print(f"| {n:.3g} | {d:.3g} | {share:g} | {mix} | {statistics.fmean(losses):.4f} ({runs}) |")

    f = fits[fam]
    lo, hi = f.ci.get("gamma", (float("nan"),) * 2)
    trend = "falls" if f["gamma"] > 0 else "rises"
    sure = lo > 0 or hi < 0
    print(f"\ngamma_{fam} = {f['gamma']:.3f} (95% CI {lo:.3f} to {hi:.3f}): its loss {trend} with its own share"
          + ("" if sure else " - but the interval includes 0, so this scale does not resolve it"))
    for noise, label in ((None, "seed replicates (F test)"), (f.rmse, "fit residual (chi-square)")):
        try:
            v = multilingual.independence_check(rows, fam, noise=noise)
        except fitting.ScalingError as e:
            print(f"independence vs {label}: not tested ({e})")
            continue
        print(f"independence vs {label}: {v['verdict']} (statistic {v['statistic']:.3g}, p = {v['p_value']:.3g}, "
              f"df {v['df']}, noise {v['noise']:.4f} log-loss, largest spread across mixtures "
              f"{v['max_spread']:.2%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
