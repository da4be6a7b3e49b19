"""Sweeps: grid expansion, run-and-record, resume without redoing finished runs, launch commands."""

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import tiny_config, write_config

from jaxlm import sweep
from jaxlm.cli import main

ROOT = Path(__file__).resolve().parent.parent


def write_sweep(tmp_path, base, record="lm"):
    path = tmp_path / "sweep.py"
    path.write_text(f'''
import ml_collections
from jaxlm.sweep import axis, named, product

def get_config():
    s = ml_collections.ConfigDict()
    s.name, s.base, s.command, s.init, s.record = "t", "{base}", "train", "", "{record}"
    s.dir = "{tmp_path / 'sweep'}"
    s.fixed = (("train.steps", 2), ("train.eval_every", 2), ("train.eval_batches", 1))
    s.points = product(named({{"small": {{"model.num_layers": 1}}}}), axis("train.lr", (1e-3, 3e-3)))
    return s
''')
    return path


def test_grid_names_and_overrides(tmp_path):
    s = sweep.load(str(write_sweep(tmp_path, "configs/quickstart.py")))
    names = [sweep.run_name(p) for p in s.points]
    assert names == ["small-lr0.001", "small-lr0.003"]
    assert sweep.overrides(s.points[1]) == [("model.num_layers", 1), ("train.lr", 0.003)]
    cfg = sweep.point_config(s, s.points[1])
    assert (cfg.model.num_layers, cfg.train.lr, cfg.train.steps) == (1, 0.003, 2)
    assert cfg.log.dir.endswith("sweep/small-lr0.003")


def test_run_records_and_skips_finished_runs(tmp_path, capsys):
    cfg = tiny_config()
    base = write_config(cfg, tmp_path / "base.py")
    path = write_sweep(tmp_path, base)
    out = tmp_path / "launch.sh"
    assert main(["sweep", "launch", str(path), "--target", "slurm", "--out", str(out)]) == 0
    assert out.read_text().count("launch/gpu_slurm.sh") == 2  # both runs to launch
    assert main(["sweep", "run", str(path)]) == 0
    results = tmp_path / "sweep" / "results.jsonl"
    rows = [json.loads(x) for x in open(results)]
    assert [r["run"] for r in rows] == ["small-lr0.001", "small-lr0.003"]
    assert all(r["D"] == 2 * 8 * 64 and r["loss"] > 0 and r["N"] > 0 for r in rows)
    assert main(["sweep", "run", str(path)]) == 0
    assert "done, skipped" in capsys.readouterr().err
    assert len(open(results).readlines()) == 2
    assert main(["sweep", "launch", str(path), "--target", "slurm", "--out", str(out)]) == 0
    assert "# generated" in out.read_text() and "launch/gpu_slurm.sh" not in out.read_text()  # nothing left


@pytest.mark.parametrize("target", ["tpu", "slurm"])
def test_launch_script_runs_each_point_through_the_launcher(tmp_path, target):
    """The generated script, run with the launchers' --dry-run, starts `jaxlm align` per unfinished run
    with the sweep's base config, overrides and --init, each run in its own log directory."""
    path = write_sweep(tmp_path, "configs/dpo.py").read_text().replace('"train", ""', '"align", "runs/sft"')
    (tmp_path / "sweep.py").write_text(path)
    (tmp_path / "sweep").mkdir()
    (tmp_path / "sweep" / "results.jsonl").write_text(json.dumps({"run": "small-lr0.001"}) + "\n")
    script = tmp_path / "launch.sh"
    assert main(["sweep", "launch", str(tmp_path / "sweep.py"), "--target", target, "--out", str(script)]) == 0
    env = {**os.environ, "TPU_NAME": "pod", "TPU_ZONE": "us-east5-a", "TPU_RUN": "r1", "GCS": "gs://b/x",
           "TPU_ARGS": "--dry-run", "SLURM_ARGS": "--dry-run --nodes 2"}
    out = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = out.stdout + out.stderr
    assert "small-lr0.001" not in text  # finished: not launched
    assert "align --config" in text and "dpo.py" in text and "--config.train.lr=0.003" in text
    assert "--config.model.num_layers=1" in text and "--init runs/sft" in text
    log_dir = f"gs://b/x/{tmp_path}/sweep/small-lr0.003" if target == "tpu" else f"{tmp_path}/sweep/small-lr0.003"
    assert f"--config.log.dir={log_dir}" in text
    if target == "slurm":
        assert "--nodes=2" in text
    env.pop("TPU_NAME")
    if target == "tpu":  # the header names what is missing
        out = subprocess.run(["bash", str(script)], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode != 0 and "TPU_NAME" in out.stderr


def test_family_shares_from_a_mixture_spec():
    spec = "ml/en.jsonl[:-5]@0.2, ml/de.jsonl@0.2, ml/fr.jsonl@0.3, ml/es.jsonl@0.3"
    shares = sweep.family_shares(spec, {"en": "Germanic", "de": "Germanic", "fr": "Romance", "es": "Romance"})
    assert abs(shares["Germanic"] - 0.4) < 1e-9 and abs(shares["Romance"] - 0.6) < 1e-9
