"""Optimal LR across token horizons: vertices, the power law, the joint fit, errors, CLI."""

import json

import numpy as np
import pytest

from jaxlm.cli import build_parser
from jaxlm.errors import ScalingError
from jaxlm.scaling import lr_horizon

HORIZONS = np.geomspace(1e9, 1e11, 5)


def sweep(D, lr_opt, factors=2.0 ** np.arange(-3, 4), curvature=0.05, floor=2.0, noise=0.0, rng=None, N=None):
    """Final losses of an LR sweep: floor + curvature * ln(lr / lr_opt)^2 (+ Gaussian noise)."""
    rows = []
    for lr in lr_opt * np.asarray(factors):
        loss = floor + curvature * np.log(lr / lr_opt) ** 2 + (noise * rng.standard_normal() if noise else 0.0)
        rows.append({"D": float(D), "lr": float(lr), "loss": float(loss)} | ({} if N is None else {"N": N}))
    return rows


def power_law_rows(B=0.7, beta=0.32, noise=0.0, seed=0, horizons=HORIZONS):
    rng = np.random.default_rng(seed)
    return [r for D in horizons for r in sweep(D, float(lr_horizon.lr_star(D, B, beta)), noise=noise, rng=rng)]


# ----------------------------------------------------------------------------- per horizon
@pytest.mark.parametrize("factors", [2.0 ** np.arange(-3, 4), 2.0 ** np.array([-4, -2.5, -1, 0.3, 1, 1.5])])
def test_vertex_is_the_true_optimum(factors):
    rows = sweep(1e10, 3e-4, factors=factors)
    v = lr_horizon.quadratic_vertex([r["lr"] for r in rows], [r["loss"] for r in rows])
    assert v["ok"] and v["reason"] == ""
    assert v["lr_star"] == pytest.approx(3e-4, rel=1e-9)
    assert v["loss_star"] == pytest.approx(2.0, abs=1e-9)


def test_vertex_rejections():
    lr = 1e-3 * 2.0 ** np.arange(-2, 3)
    down = lr_horizon.quadratic_vertex(lr, 3 - 0.05 * np.log(lr / 1e-3) ** 2)
    assert not down["ok"] and "opens downward" in down["reason"]
    outside = lr_horizon.quadratic_vertex(lr, 2 + 0.05 * np.log(lr / 1e-1) ** 2)
    assert not outside["ok"] and "outside the sampled learning rates" in outside["reason"]
    assert outside["lr_star"] == pytest.approx(1e-1)
    two = lr_horizon.quadratic_vertex([1e-3, 2e-3, 1e-3], [2.0, 2.1, 2.0])
    assert not two["ok"] and "at least 3" in two["reason"]


# ----------------------------------------------------------------------------- power law
def test_power_law_exact_without_noise():
    result = lr_horizon.fit(power_law_rows())
    assert result["beta"] == pytest.approx(0.32, rel=1e-8) and result["B"] == pytest.approx(0.7, rel=1e-6)
    assert sorted(result["per_horizon"]) == pytest.approx(list(HORIZONS))
    for D, lr in result["per_horizon"].items():
        assert lr == pytest.approx(float(lr_horizon.lr_star(D, 0.7, 0.32)), rel=1e-8)
    assert result["N"] is None and result["joint"] is None and result["warnings"] == []


def test_power_law_recovers_beta_with_noise():
    result = lr_horizon.fit(power_law_rows(noise=0.002, seed=3))
    assert result["beta"] == pytest.approx(0.32, rel=0.05)
    lo, hi = result["ci"]["beta"]
    assert lo < 0.32 < hi and hi - lo < 0.1
    lo, hi = result["ci"]["B"]
    assert lo < result["B"] < hi


def test_joint_fit_over_sizes():
    rows = [r for N in (1e7, 1e8, 1e9) for D in HORIZONS
            for r in sweep(D, float(lr_horizon.joint_lr_star(N, D, 5.0, 0.1, 0.32)), N=N)]
    result = lr_horizon.fit(rows)
    joint = result["joint"]
    assert joint["C"] == pytest.approx(5.0, rel=1e-6)
    assert joint["alpha"] == pytest.approx(0.1, rel=1e-6) and joint["beta"] == pytest.approx(0.32, rel=1e-6)
    assert result["N"] == 1e9 and set(result["per_size"]) == {1e7, 1e8, 1e9}
    assert result["beta"] == pytest.approx(0.32, rel=1e-6)
    assert result["B"] == pytest.approx(5.0 * 1e9 ** -0.1, rel=1e-6)
    assert lr_horizon.lr_at(result, 1e12, N=1e10) == pytest.approx(5.0 * 1e10 ** -0.1 * 1e12 ** -0.32, rel=1e-6)
    assert set(joint["ci"]) == {"C", "alpha", "beta"}


def test_bad_horizons_are_dropped_with_warnings():
    rows = power_law_rows(horizons=HORIZONS[:3])
    lrs = 1e-3 * 2.0 ** np.arange(-2, 3)
    rows += [{"D": 5e11, "lr": lr, "loss": 3 - 0.05 * np.log(lr / 1e-3) ** 2} for lr in lrs]
    rows += [{"D": 7e11, "lr": lr, "loss": 2 + 0.05 * np.log(lr / 1.0) ** 2} for lr in lrs]
    result = lr_horizon.fit(rows)
    assert len(result["per_horizon"]) == 3 and result["beta"] == pytest.approx(0.32, rel=1e-8)
    text = "\n".join(result["warnings"])
    assert "D=5e+11: dropped" in text and "opens downward" in text
    assert "D=7e+11: dropped" in text and "outside the sampled" in text
    assert not result["parabolas"][(None, 5e11)]["ok"]


def test_two_horizons_fit_without_interval():
    result = lr_horizon.fit(power_law_rows(horizons=HORIZONS[:2]))
    assert result["beta"] == pytest.approx(0.32) and result["ci"] == {}
    assert any("no confidence interval" in w for w in result["warnings"])


def test_lr_for_horizon():
    assert lr_horizon.lr_for_horizon(3e-3, 1e10, 1e10) == pytest.approx(3e-3)
    assert lr_horizon.lr_for_horizon(3e-3, 1e10, 1e11) == pytest.approx(3e-3 * 10 ** -0.32)
    assert lr_horizon.lr_for_horizon(3e-3, 1e10, 1e11, beta=0.5) == pytest.approx(3e-3 * 10 ** -0.5)
    many = lr_horizon.lr_for_horizon(3e-3, 1e10, np.array([1e10, 1e11]))
    np.testing.assert_allclose(many, [3e-3, 3e-3 * 10 ** -0.32])
    # consistent with the fitted law: moving along LR*(D) = B D^-beta
    assert lr_horizon.lr_for_horizon(lr_horizon.lr_star(1e9, 0.7, 0.32), 1e9, 1e11) == pytest.approx(
        float(lr_horizon.lr_star(1e11, 0.7, 0.32)))
    with pytest.raises(ScalingError, match="lr0 must be finite and > 0"):
        lr_horizon.lr_for_horizon(0.0, 1e10, 1e11)
    with pytest.raises(ScalingError, match="d must be"):
        lr_horizon.lr_for_horizon(1e-3, 1e10, -1)


# ----------------------------------------------------------------------------- degenerate input
@pytest.mark.parametrize("mutate,message", [
    (lambda rows: [r for r in rows if r["D"] == rows[0]["D"]], "need at least 2 usable horizons"),
    (lambda rows: [dict(r, loss=-r["loss"]) if i == 4 else r for i, r in enumerate(rows)],
     "row 4: column 'loss' must be > 0"),
    (lambda rows: [dict(rows[0], lr=0.0)] + rows[1:], "column 'lr' must be > 0"),
    (lambda rows: [dict(rows[0], D="ten")] + rows[1:], "row 0: column 'D': 'ten' is not a number"),
    (lambda rows: [dict(rows[0], N=1e8)] + rows[1:], "row 1: column 'N' is missing here"),
    (lambda rows: [{k: v for k, v in rows[0].items() if k != "loss"}] + rows[1:], "missing column 'loss'"),
    (lambda rows: [dict(r, loss=4 - r["loss"]) for r in rows], "got 0 of 5(.|\n)*opens downward"),
])
def test_degenerate_inputs_give_clear_errors(mutate, message):
    with pytest.raises(ScalingError, match=message):
        lr_horizon.fit(mutate(power_law_rows()))


# ----------------------------------------------------------------------------- CLI
def run_cli(argv):
    """The `fit` command's function, called directly (errors propagate instead of being printed)."""
    args = build_parser("fit").parse_args(argv)
    return args.func(args, [])


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_cli_prints_tables_and_writes_plot(tmp_path, capsys, fmt):
    rows = power_law_rows(noise=0.001)
    rows += [{"D": 5e11, "lr": lr, "loss": 2 + 0.05 * np.log(lr) ** 2} for lr in (1e-4, 1e-3, 1e-2)]
    path = tmp_path / f"sweep.{fmt}"
    if fmt == "csv":
        path.write_text("D,lr,loss,seed\n" + "".join(f"{r['D']},{r['lr']},{r['loss']},0\n" for r in rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    png = tmp_path / "lr.png"
    assert run_cli(["fit", "lr-horizon", str(path), "--plot", str(png), "--horizon", "1e12"]) == 0
    out = capsys.readouterr()
    for word in ("LR*", "beta", "dropped", "1e+12"):
        assert word in out.out
    assert "warning" in out.err and f"wrote {png}" in out.err.replace("\n", "")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_default_plot_path_and_help(tmp_path, capsys):
    path = tmp_path / "sweep.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in power_law_rows()))
    assert run_cli(["fit", "lr-horizon", str(path)]) == 0
    assert (tmp_path / "sweep.lr_horizon.png").is_file()
    with pytest.raises(SystemExit) as e:
        run_cli(["fit", "lr-horizon", "--help"])
    assert e.value.code == 0 and "--horizon" in capsys.readouterr().out


def test_cli_bad_input(tmp_path):
    with pytest.raises(ScalingError, match="no such file"):
        run_cli(["fit", "lr-horizon", str(tmp_path / "missing.csv")])
    path = tmp_path / "sweep.csv"
    path.write_text("D,lr,loss\n1e9,1e-3,2.0\n1e9,2e-3,abc\n")
    with pytest.raises(ScalingError, match=r"sweep\.csv:3: column 'loss': 'abc' is not a number"):
        run_cli(["fit", "lr-horizon", str(path)])
    path.write_text("D,learning_rate,loss\n1e9,1e-3,2.0\n")
    with pytest.raises(ScalingError, match=r"sweep\.csv:1: missing column 'lr'"):
        run_cli(["fit", "lr-horizon", str(path)])
