"""Multilingual scaling law: recovery from synthetic tables, optimal ratios, independence, errors, CLI."""

import itertools
import json

import numpy as np
import pytest

from jaxlm.cli import build_parser
from jaxlm.errors import ScalingError
from jaxlm.scaling import fitting, multilingual

TRUE = {  # Chinchilla-like magnitudes; gamma differs per family
    "en": dict(E=1.7, A=400.0, alpha=0.34, B=410.0, beta=0.28, gamma=0.12),
    "zh": dict(E=2.1, A=250.0, alpha=0.30, B=900.0, beta=0.32, gamma=0.20),
    "sw": dict(E=2.4, A=150.0, alpha=0.25, B=600.0, beta=0.30, gamma=0.30),
}


def synth(params=TRUE, n=7, ps=(0.05, 0.2, 0.5, 1.0), noise=0.01, seed=0):
    """Rows from the law on an n x n x len(ps) grid (N over 1e6..1e10, D over 1e8..1e12), with
    multiplicative log-normal noise. Four decades of N and D: with 1% noise, fewer leave the exponents
    uncertain by more than 5% (their Fisher-information standard error grows past 2%)."""
    rng = np.random.default_rng(seed)
    rows = []
    for family, p in params.items():
        for N, D, ratio in itertools.product(np.geomspace(1e6, 1e10, n), np.geomspace(1e8, 1e12, n), ps):
            loss = multilingual.predict(p, N, D, ratio) * np.exp(noise * rng.standard_normal())
            rows.append({"family": family, "N": N, "D": D, "p": ratio, "loss": float(loss)})
    return rows


# ----------------------------------------------------------------------------- fitting
def test_recovers_exponents_at_one_percent_noise():
    fits = multilingual.fit(synth(), bootstrap=8)
    assert set(fits) == set(TRUE)
    for family, true in TRUE.items():
        got = fits[family]
        assert set(got) >= set(multilingual.PARAMS)
        for k in ("alpha", "beta", "gamma"):
            assert got[k] == pytest.approx(true[k], rel=0.05), (family, k)
        assert got["E"] == pytest.approx(true["E"], rel=0.1)
        assert 0.007 < got.rmse < 0.013  # the noise level
        lo, hi = got.ci["gamma"]
        assert lo <= got["gamma"] <= hi and hi - lo < 0.1 * true["gamma"]


def test_recovers_all_parameters_without_noise():
    params = {k: TRUE[k] for k in ("en", "sw")}
    fits = multilingual.fit(synth(params, n=5, ps=(0.1, 0.4, 1.0), noise=0.0), bootstrap=0)
    for family, true in params.items():
        for k, v in true.items():
            assert fits[family][k] == pytest.approx(v, rel=2e-3), (family, k)
        assert fits[family].rmse < 1e-5 and fits[family].ci == {}


def test_huber_is_quadratic_then_linear():
    r = np.array([-1.0, -1e-4, 0.0, 2e-4, 3.0])
    np.testing.assert_allclose(fitting.huber(r, 1e-3), [1e-3 * (1 - 5e-4), 5e-9, 0, 2e-8, 1e-3 * (3 - 5e-4)])


# ----------------------------------------------------------------------------- optimal ratios
def brute_force(params, N, D, weights, normalized, p_min, step=0.001):
    fams = list(params)
    a = np.arange(0, 1 + step / 2, step)
    p1, p2 = np.meshgrid(a, a, indexing="ij")
    p = np.stack([p1, p2, 1 - p1 - p2], -1).reshape(-1, 3)
    p = p[np.all(p >= p_min - 1e-12, axis=1) & np.all(p > 0, axis=1)]
    total = 0.0
    for i, f in enumerate(fams):
        scale = 1.0 / multilingual.predict(params[f], N, D, 1.0) if normalized else 1.0
        total = total + weights[f] * multilingual.predict(params[f], N, D, p[:, i]) * scale
    return dict(zip(fams, p[np.argmin(total)]))


@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("p_min", [0.0, 0.25])
def test_optimal_ratios_match_brute_force(normalized, p_min):
    weights = {"en": 1.0, "zh": 0.5, "sw": 2.0}
    got = multilingual.optimal_ratios(TRUE, 1e8, 1e10, weights=weights, normalized=normalized, p_min=p_min)
    want = brute_force(TRUE, 1e8, 1e10, weights, normalized, p_min)
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-12)
    assert min(got.values()) >= p_min - 1e-12
    for f in TRUE:
        assert got[f] == pytest.approx(want[f], abs=2e-3), f
    if p_min:
        assert got["zh"] == pytest.approx(p_min)  # the floor binds for the light, low-gamma family


@pytest.mark.parametrize("normalized", [False, True])
def test_closed_form_agrees_with_numeric_solver(normalized):
    weights = {"en": 3.0, "zh": 1.0, "sw": 0.5}
    closed = multilingual.optimal_ratios(TRUE, 1e9, 1e11, weights=weights, normalized=normalized)
    numeric = multilingual.optimal_ratios(TRUE, 1e9, 1e11, weights=weights, normalized=normalized,
                                          method="numeric")
    for f in TRUE:
        assert closed[f] == pytest.approx(numeric[f], abs=1e-5)
    # stationarity: w_i gamma_i c_i p_i^-(gamma_i + 1) is the same lambda for every family
    lam = [weights[f] * TRUE[f]["gamma"] * closed[f] ** -(TRUE[f]["gamma"] + 1)
           * (1.0 if normalized else float(multilingual.predict(TRUE[f], 1e9, 1e11, 1.0))) for f in TRUE]
    np.testing.assert_allclose(lam, lam[0], rtol=1e-9)


def test_equal_weights_normalised_closed_form_two_families():
    # gamma_1 p^-(gamma_1+1) = gamma_2 (1-p)^-(gamma_2+1): with equal gammas the split is even
    params = {"a": dict(TRUE["en"]), "b": dict(TRUE["zh"], gamma=TRUE["en"]["gamma"])}
    got = multilingual.optimal_ratios(params, normalized=True)
    assert got == pytest.approx({"a": 0.5, "b": 0.5})


@pytest.mark.parametrize("kwargs,message", [
    (dict(p_min=0.5), "infeasible"),
    (dict(p_min=-0.1), "infeasible"),
    (dict(weights={"xx": 1.0}), "unknown families"),
    (dict(weights={"en": -1.0}), "weights must be >= 0"),
    (dict(method="magic"), "unknown method"),
    (dict(N=None), "need N > 0 and D > 0"),
    (dict(D=-1.0), "need N > 0 and D > 0"),
])
def test_optimal_ratio_errors(kwargs, message):
    with pytest.raises(ScalingError, match=message):
        multilingual.optimal_ratios(TRUE, **({"N": 1e8, "D": 1e10} | kwargs))


def test_no_family_gains_from_data():
    flat = {f: dict(p, gamma=0.0) for f, p in TRUE.items()}
    with pytest.raises(ScalingError, match="gamma > 0"):
        multilingual.optimal_ratios(flat, 1e8, 1e10)


# ----------------------------------------------------------------------------- independence
def mixture_rows(dependence=0.0, seeds=3, seed=0):
    """Runs of family en at fixed (N, D, p_en) while zh and sw share the rest in varying proportions.
    With `dependence`, en's loss is scaled by (1 + dependence * p_zh), violating the law. The test is
    at level 0.05, so about one seed in twenty rejects independence by chance; seed 0 gives p = 0.8."""
    rng = np.random.default_rng(seed)
    rows = []
    for N, D, p_en in [(1e8, 1e10, 0.2), (1e9, 1e10, 0.2), (1e8, 1e11, 0.5)]:
        for q in (0.2, 0.5, 0.8):
            p_zh, p_sw = (1 - p_en) * q, (1 - p_en) * (1 - q)
            for s in range(seeds):
                loss = multilingual.predict(TRUE["en"], N, D, p_en) * (1 + dependence * p_zh)
                rows.append({"family": "en", "N": N, "D": D, "p": p_en, "p_en": p_en, "p_zh": p_zh, "p_sw": p_sw,
                             "seed": s, "loss": float(loss * np.exp(0.01 * rng.standard_normal()))})
    return rows


def test_independence_holds_on_data_from_the_law():
    v = multilingual.independence_check(mixture_rows(), "en")
    assert v["verdict"] == "independent" and v["test"] == "F"
    assert v["statistic"] < v["threshold"] and v["p_value"] > 0.05 and v["df"] == (6, 18)


def test_dependence_is_detected():
    v = multilingual.independence_check(mixture_rows(dependence=0.2), "en")
    assert v["verdict"] == "dependent" and v["p_value"] < 1e-3 and v["statistic"] > v["threshold"]
    assert v["max_spread"] > 0.05


def test_independence_without_replicates_uses_given_noise():
    ind = [dict(r, mixture=f"m{i % 3}") for i, r in enumerate(mixture_rows(seeds=1))]
    for r in ind:  # a mixture id instead of ratio columns
        del r["p_zh"], r["p_sw"], r["p_en"]
    with pytest.raises(ScalingError, match="no replicate runs"):
        multilingual.independence_check(ind, "en")
    assert multilingual.independence_check(ind, "en", noise=0.01)["verdict"] == "independent"
    dep = mixture_rows(dependence=0.2, seeds=1)
    v = multilingual.independence_check(dep, "en", noise=0.01)
    assert v["verdict"] == "dependent" and v["test"] == "chi2"


def test_independence_needs_mixture_information():
    rows = [{k: v for k, v in r.items() if not k.startswith("p_")} for r in mixture_rows()]
    with pytest.raises(ScalingError, match="'mixture' column or p_<family>"):
        multilingual.independence_check(rows, "en")


# ----------------------------------------------------------------------------- degenerate input
def _small():
    return synth({"en": TRUE["en"]}, n=3, ps=(0.2, 1.0), noise=0.0)


@pytest.mark.parametrize("mutate,message", [
    (lambda rows: rows[:5], "5 rows, need at least 7"),
    (lambda rows: [dict(r, N=1e8) for r in rows], "same N"),
    (lambda rows: [dict(r, p=0.5) for r in rows], "same p"),
    (lambda rows: rows[:3] + [dict(rows[3], loss=-1.0)] + rows[4:], r"row 3: column 'loss' must be > 0"),
    (lambda rows: [dict(rows[0], p=0.0)] + rows[1:], r"'p' must be \(0, 1\]"),
    (lambda rows: [dict(rows[0], p=1.5)] + rows[1:], r"'p' must be \(0, 1\]"),
    (lambda rows: [dict(rows[0], loss="abc")] + rows[1:], "row 0: column 'loss': 'abc' is not a number"),
    (lambda rows: [dict(rows[0], loss=float("nan"))] + rows[1:], "not finite"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "D"}] + rows[1:], "missing column 'D'"),
    (lambda rows: [], "no rows"),
])
def test_degenerate_inputs_give_clear_errors(mutate, message):
    with pytest.raises(ScalingError, match=message):
        multilingual.fit(mutate(_small()), bootstrap=0)


# ----------------------------------------------------------------------------- tables and CLI
def run_cli(argv):
    """The `fit` command's function, called directly (errors propagate instead of being printed)."""
    args = build_parser("fit").parse_args(argv)
    return args.func(args, [])


def write_csv(path, rows, columns=("family", "N", "D", "p", "loss")):
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_cli_prints_tables_and_writes_plot(tmp_path, capsys, fmt):
    rows = synth({"en": TRUE["en"], "zh": TRUE["zh"]}, n=3, ps=(0.2, 0.5, 1.0), seed=1)
    path = tmp_path / f"results.{fmt}"
    if fmt == "csv":
        write_csv(path, rows)
    else:
        path.write_text("".join(json.dumps(dict(r, run="x")) + "\n" for r in rows))
    png = tmp_path / "ml.png"
    assert run_cli(["fit", "multilingual", str(path), "--plot", str(png), "--bootstrap", "4",
                    "--weights", "en=1,zh=2", "--p-min", "0.1"]) == 0
    out = capsys.readouterr()
    for word in ("gamma", "alpha", "RMSE", "optimal p", "en", "zh"):
        assert word in out.out
    assert f"wrote {png}" in out.err.replace("\n", "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_help(capsys):
    for argv in (["fit", "--help"], ["fit", "multilingual", "--help"]):
        with pytest.raises(SystemExit) as e:
            run_cli(argv)
        assert e.value.code == 0
    assert "--normalized" in capsys.readouterr().out


def test_cli_bad_tables_name_file_line_and_column(tmp_path):
    rows = _small()
    with pytest.raises(ScalingError, match="no such file"):
        run_cli(["fit", "multilingual", str(tmp_path / "nope.csv")])
    missing = write_csv(tmp_path / "missing.csv", rows, columns=("family", "N", "D", "p"))
    with pytest.raises(ScalingError, match=r"missing\.csv:1: missing column 'loss'"):
        run_cli(["fit", "multilingual", str(missing)])
    bad = write_csv(tmp_path / "bad.csv", rows[:2] + [dict(rows[2], loss="n/a")] + rows[3:])
    with pytest.raises(ScalingError, match=r"bad\.csv:4: column 'loss': 'n/a' is not a number"):
        run_cli(["fit", "multilingual", str(bad), "--no-plot"])
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps(rows[0]) + "\n{not json\n")
    with pytest.raises(ScalingError, match=r"bad\.jsonl:2: not valid JSON"):
        run_cli(["fit", "multilingual", str(jl)])
    with pytest.raises(ScalingError, match="--weights"):
        run_cli(["fit", "multilingual", str(write_csv(tmp_path / "ok.csv", rows)), "--weights", "en:1",
                 "--bootstrap", "0", "--no-plot"])
