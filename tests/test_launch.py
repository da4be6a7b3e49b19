"""The launchers in launch/: shell syntax (bash -n, shellcheck), the commands their --dry-run prints,
the SLURM batch script against fake srun/scontrol, and launch/local.sh running the multi-host path for
real: 2 processes x 4 CPU devices, jax.distributed over a localhost coordinator, FSDP across the
processes, one checkpoint saved by both and restored, losses equal to one process's."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_losses, tiny_config, write_config

LAUNCH = REPO / "launch"
SCRIPTS = sorted(p for p in LAUNCH.iterdir() if p.suffix in (".sh", ".sbatch"))


@pytest.fixture
def no_cloud(tmp_path):
    """PATH with gcloud / sbatch / srun stand-ins that record any call and fail: a dry run must call none."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    for tool in ("gcloud", "sbatch", "srun", "scontrol"):
        f = bin_dir / tool
        f.write_text(f'#!/usr/bin/env bash\necho "{tool} $*" >> {calls}\nexit 97\n')
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return env, calls


def sh(args, env, cwd=REPO, check=True):
    r = subprocess.run(["bash", *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, r.stdout + r.stderr
    return r


def test_scripts_pass_bash_n():
    assert {p.name for p in SCRIPTS} >= {"tpu_pod.sh", "gpu_slurm.sh", "gpu_slurm.sbatch", "local.sh"}
    for p in SCRIPTS:
        r = subprocess.run(["bash", "-n", str(p)], capture_output=True, text=True)
        assert r.returncode == 0, (p.name, r.stderr)
        assert p.name == "common.sh" or os.access(p, os.X_OK), f"{p.name} is not executable"  # common.sh is sourced


def test_scripts_pass_shellcheck():
    if not shutil.which("shellcheck"):
        pytest.skip("shellcheck is not installed")
    r = subprocess.run(["shellcheck", *map(str, SCRIPTS)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_tpu_pod_dry_run(no_cloud, tmp_path):
    env, calls = no_cloud
    out = sh([LAUNCH / "tpu_pod.sh", "up", "--dry-run", "--name", "pod", "--zone", "us-west4-a",
              "--type", "v5litepod-16", "--config", "configs/quickstart.py", "--gcs", "gs://bkt/jaxlm/",
              "--run-name", "r1", "--logs", tmp_path / "logs", "--", "--config.train.steps=100"], env)
    text = out.stderr + out.stdout
    assert not calls.exists(), calls.read_text()
    lines = [x for x in text.splitlines() if x.startswith("+ gcloud")]
    assert "tpu-vm describe pod" in lines[0]
    create = next(x for x in lines if "tpu-vm create pod" in x)
    for flag in ("--zone=us-west4-a", "--accelerator-type=v5litepod-16", "--version=v2-alpha-tpuv5-lite"):
        assert flag in create
    scp = next(x for x in lines if "tpu-vm scp" in x and "jaxlm-src.tar.gz" in x)
    assert "--worker=all" in scp and "pod:jaxlm/r1/" in scp and "quickstart.py" in scp
    ssh = [x for x in lines if "tpu-vm ssh pod" in x]
    assert ssh and all("--worker=all" in x for x in ssh)
    install = next(x for x in ssh if "pip install" in x)
    assert '"jaxlm[tpu] @ file://$HOME/jaxlm/r1/src"' in install and "gcsfs" in install
    train = next(x for x in ssh if "jaxlm train --config" in x)
    for part in ("jaxlm train --config quickstart.py", "--config.log.dir=gs://bkt/jaxlm/r1",
                 "--config.checkpoint.dir=gs://bkt/jaxlm/r1/checkpoints", "--config.train.steps=100",
                 "logs/slice-0-worker-", "train.pid"):
        assert part in train, part
    assert any("tpu-vm scp" in x and "pod:jaxlm/r1/logs/*" in x for x in lines)  # per-worker logs

    # multislice through a queued resource; stop and delete
    out = sh([LAUNCH / "tpu_pod.sh", "create", "--dry-run", "--name", "big", "--zone", "us-east5-a",
              "--type", "v5p-64", "--num-slices", "2", "--spot"], env)
    assert "queued-resources create big --zone=us-east5-a --node-count=2 --node-prefix=big " \
           "--accelerator-type=v5p-64 --runtime-version=v2-alpha-tpuv5 --spot" in out.stderr
    out = sh([LAUNCH / "tpu_pod.sh", "stop", "--dry-run", "--name", "pod", "--zone", "z"], env)
    assert "--worker=all" in out.stderr and "kill $pid" in out.stderr and "jaxlm/current" in out.stderr
    out = sh([LAUNCH / "tpu_pod.sh", "delete", "--dry-run", "--name", "pod", "--zone", "z"], env)
    assert "gcloud compute tpus tpu-vm delete pod --zone=z --quiet" in out.stderr
    out = sh([LAUNCH / "tpu_pod.sh", "train", "--name", "pod", "--zone", "z", "--config", "x.py"], env, check=False)
    assert out.returncode == 2 and "--run-name" in out.stderr
    assert not calls.exists()


def test_tpu_pod_setup_and_train_with_fake_gcloud(tmp_path):
    """The real (not dry) path against a gcloud stand-in that records calls and keeps what scp sends:
    the tarball holds the working tree (tracked + untracked, not ignored, not deleted files)."""
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    for f in ("pyproject.toml", "pkg/a.py", "pkg/gone.py", ".gitignore"):
        (src / f).write_text("x\n" if f != ".gitignore" else "ignored.txt\n")
    git = ["git", "-C", str(src), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(git + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "x"], check=True)
    (src / "pkg" / "gone.py").unlink()
    (src / "pkg" / "new.py").write_text("y\n")
    (src / "ignored.txt").write_text("z\n")
    (tmp_path / "my_cfg.py").write_text("def get_config(): ...\n")
    keep, calls = tmp_path / "sent", tmp_path / "calls.txt"
    keep.mkdir()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "gcloud").write_text(f"""#!/usr/bin/env bash
printf '%s\\n' "$*" >> {calls}
[[ "$*" == *"tpu-vm describe"* ]] && exit 0   # the TPU exists: reuse it
if [[ "$*" == *" scp "* ]]; then for a in "$@"; do [[ -f "$a" ]] && cp "$a" {keep}/; done; fi
exit 0
""")
    (bin_dir / "gcloud").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    sh([LAUNCH / "tpu_pod.sh", "up", "--name", "pod", "--zone", "z", "--source", src, "--config",
        tmp_path / "my_cfg.py:arg", "--gcs", "gs://b/r", "--run-name", "r2", "--logs", tmp_path / "logs"], env,
       cwd=tmp_path)
    import tarfile

    with tarfile.open(keep / "jaxlm-src.tar.gz") as t:
        names = {n.removeprefix("./") for n in t.getnames()}
    assert names == {".gitignore", "pyproject.toml", "pkg/a.py", "pkg/new.py"}
    assert (keep / "my_cfg.py").exists()
    log = calls.read_text()
    assert "tpu-vm create" not in log  # reused
    assert "jaxlm train --config my_cfg.py:arg --config.log.dir=gs://b/r/r2" in log


def test_gpu_slurm_dry_run(no_cloud):
    env, calls = no_cloud
    out = sh([LAUNCH / "gpu_slurm.sh", "--dry-run", "--nodes", "2", "--gpus-per-node", "8", "--partition", "gpu",
              "--", "--config", "configs/quickstart.py", "--config.parallel.fsdp=16"], env)
    text = out.stdout
    assert not calls.exists()
    sbatch = next(x for x in text.splitlines() if x.startswith("+ sbatch"))
    for flag in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu", "gpu_slurm.sbatch",
                 "--config configs/quickstart.py --config.parallel.fsdp=16"):
        assert flag in sbatch, flag
    assert 'srun --kill-on-bad-exit=1' in text
    assert '$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)' in text  # the first node
    task = text.split("# each task runs:")[1]
    for part in ("jaxlm train --config configs/quickstart.py", '--coordinator "$(scontrol show hostnames',
                 '--num-processes "$SLURM_NTASKS"', '--process-id "$SLURM_PROCID"'):
        assert part in task, part
    assert "--signal=TERM@60" in sbatch and "--requeue" not in sbatch  # SIGTERM (a checkpoint) before the time limit
    assert "trap 'scancel --signal=TERM $SLURM_JOB_ID' TERM" in text  # passed to the tasks, not to srun
    out = sh([LAUNCH / "gpu_slurm.sh", "--dry-run", "--per-gpu", "--", "--config", "c.py"], env)
    assert "--ntasks-per-node=8" in out.stdout and "JAX_LOCAL_DEVICE_IDS" in out.stdout
    # CPU tasks, requeued after a SIGTERM stop
    out = sh([LAUNCH / "gpu_slurm.sh", "--dry-run", "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
              "--requeue", "--", "--config", "c.py"], env)
    sbatch = next(x for x in out.stdout.splitlines() if x.startswith("+ sbatch"))
    for flag in ("--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--requeue", "--open-mode=append",
                 "JAXLM_REQUEUE=1"):
        assert flag in sbatch, flag
    assert "scontrol requeue $SLURM_JOB_ID" in out.stdout and "--resume" in out.stdout
    for bad, msg in ((["--per-gpu", "--gpus-per-node", "0"], "--per-gpu needs GPUs"),
                     (["--gpus-per-node", "x"], "expected a number"), (["--tasks-per-node", "0"], "positive integer")):
        out = sh([LAUNCH / "gpu_slurm.sh", "--dry-run", *bad, "--", "--config", "c.py"], env, check=False)
        assert out.returncode == 2 and msg in out.stderr, (bad, out.stderr)
    assert not calls.exists()


@pytest.mark.parametrize("per_gpu", [False, True])
def test_gpu_slurm_batch_script_with_fake_srun(tmp_path, per_gpu):
    """The batch script's real path, with srun/scontrol stand-ins that start the tasks here."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text('#!/usr/bin/env bash\nprintf "gpu007\\ngpu008\\n"\n')
    ntasks, per_node = (4, 2) if per_gpu else (2, 1)
    # srun --kill-on-bad-exit=1 ... --output=DIR/task-%t.log CMD...: run each task with SLURM's variables
    (bin_dir / "srun").write_text(f"""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do [[ "$1" == --output=* ]] && out="${{1#--output=}}"; shift; done
for t in $(seq 0 {ntasks - 1}); do
  SLURM_PROCID=$t SLURM_LOCALID=$((t % {per_node})) SLURM_NTASKS={ntasks} \\
  SLURM_STEP_TASKS_PER_NODE="{per_node}(x2)" "$@" > "${{out//%t/$t}}" 2>&1 || exit 1
done
""")
    (bin_dir / "fakejaxlm").write_text('#!/usr/bin/env bash\necho "ids=${JAX_LOCAL_DEVICE_IDS:-all} $*"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[007-008]", "SLURM_NTASKS": str(ntasks), "SLURM_JOB_NUM_NODES": "2",
           "JAXLM_BIN": "fakejaxlm", "JAXLM_LOG_DIR": str(tmp_path / "logs"), "CUDA_VISIBLE_DEVICES": "0,1"}
    sh([LAUNCH / "gpu_slurm.sbatch", "--config", "c.py", "--config.train.steps=5"], env)
    port = 4242 % 4096 + 61440
    for t in range(ntasks):
        line = (tmp_path / "logs" / f"task-{t}.log").read_text().strip()
        ids = t % per_node if per_gpu else "all"
        assert line == f"ids={ids} train --config c.py --config.train.steps=5 --coordinator gpu007:{port} " \
                       f"--num-processes {ntasks} --process-id {t}"


def test_gpu_slurm_batch_script_requeue_resume_and_errors_with_fakes(tmp_path):
    """The batch script's decisions, against stand-ins (tests/test_slurm.py runs them on a real cluster):
    a task's `error:` line reaches the batch log; tasks stopped by SIGTERM (exit 143) requeue a running
    job with JAXLM_REQUEUE=1 and not a cancelled one; a requeued run gets --resume when its checkpoint
    directory holds a checkpoint, and not before."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.txt"
    (bin_dir / "scontrol").write_text(f"""#!/usr/bin/env bash
echo "scontrol $*" >> {calls}
case "$*" in "show hostnames"*) echo node1 ;; "show job"*) echo "JobId=4242 JobState=$FAKE_STATE Restarts=0" ;; esac
""")
    (bin_dir / "scancel").write_text(f'#!/usr/bin/env bash\necho "scancel $*" >> {calls}\n')
    (bin_dir / "srun").write_text("""#!/usr/bin/env bash
while [[ "$1" == --* ]]; do [[ "$1" == --output=* ]] && out="${1#--output=}"; shift; done
rc=0
for t in 0 1; do
  r=0; SLURM_PROCID=$t SLURM_LOCALID=$t SLURM_NTASKS=2 "$@" >> "${out//%t/$t}" 2>&1 || r=$?
  (( r > rc )) && rc=$r
done
exit $rc  # like srun: the highest status
""")
    # FAKE_RC (every task) or FAKE_RC_<task>; FAKE_ERROR: an `error:` line from the failing task
    (bin_dir / "fakejaxlm").write_text('#!/usr/bin/env bash\necho "argv: $*"\nv="FAKE_RC_$SLURM_PROCID"\n'
                                       'rc="${!v:-${FAKE_RC:-0}}"\n'
                                       'if [[ $rc == 2 ]]; then echo "error: $FAKE_ERROR" >&2; fi\nexit "$rc"\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    base = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
            "SLURM_JOB_NODELIST": "node1", "SLURM_JOB_NUM_NODES": "1", "JAXLM_BIN": "fakejaxlm",
            "JAXLM_PYTHON": sys.executable, "FAKE_STATE": "RUNNING"}
    run_dir = tmp_path / "run"
    args = [LAUNCH / "gpu_slurm.sbatch", "--config", "configs/quickstart.py", f"--config.log.dir={run_dir}"]

    def batch(name, **env):
        calls.unlink(missing_ok=True)
        r = sh(args, {**base, "JAXLM_LOG_DIR": str(tmp_path / name), **env}, check=False)
        return r, (tmp_path / name / "task-0.log").read_text(), calls.read_text() if calls.exists() else ""

    err = "model.num_heads 3 is not divisible by model.num_kv_heads 2"
    r, _, _ = batch("fail", FAKE_RC="2", FAKE_ERROR=err)
    assert r.returncode == 2
    assert f"task 0: error: {err}" in r.stderr and f"task 1: error: {err}" in r.stderr, r.stderr
    # task 1 fails; srun stops task 0, which exits 143 as on a preemption: still a failure, not requeued
    r, _, log = batch("fail-one", FAKE_RC_0="143", FAKE_RC_1="2", FAKE_ERROR=err, JAXLM_REQUEUE="1")
    assert r.returncode == 2 and f"task 1: error: {err}" in r.stderr and "requeue" not in log, r.stderr

    r, _, log = batch("stop", FAKE_RC="143", JAXLM_REQUEUE="1")
    assert r.returncode == 0 and "requeueing job 4242" in r.stderr and "scontrol requeue 4242" in log, r.stderr
    r, _, log = batch("cancelled", FAKE_RC="143", JAXLM_REQUEUE="1", FAKE_STATE="COMPLETING")
    assert r.returncode == 143 and "not requeueing" in r.stderr and "requeue 4242" not in log, r.stderr
    r, _, log = batch("stop-no-requeue", FAKE_RC="143")
    assert r.returncode == 143 and "--resume" in r.stderr and "requeue" not in log, r.stderr

    r, task, _ = batch("restart-early", SLURM_RESTART_COUNT="1")  # requeued before any checkpoint
    assert r.returncode == 0 and "no checkpoint in" in r.stderr and "--resume" not in task, r.stderr + task
    (run_dir / "checkpoints" / "7").mkdir(parents=True)
    r, task, _ = batch("restart", SLURM_RESTART_COUNT="1")
    assert r.returncode == 0, r.stderr
    assert f"restart 1 of job 4242: resuming from step 7 in {run_dir / 'checkpoints'}" in r.stderr, r.stderr
    assert f"--config.log.dir={run_dir} --resume --coordinator node1:" in task
    assert task.startswith("--- job 4242, restart 1 ---")


def test_slurm_local_refuses_and_reports(tmp_path):
    """launch/slurm_local.sh without root refuses to start anything; `status` of an empty prefix says so
    (tests/test_slurm.py brings a cluster up for real)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "id").write_text("#!/usr/bin/env bash\necho 1000\n")  # not root
    (bin_dir / "id").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "JAXLM_SLURM_PREFIX": str(tmp_path / "slurm")}
    r = sh([LAUNCH / "slurm_local.sh", "up"], env, check=False)
    assert r.returncode == 2 and "up needs root" in r.stderr and "sudo" in r.stderr, r.stderr
    assert not (tmp_path / "slurm").exists()
    r = sh([LAUNCH / "slurm_local.sh", "status"], env, check=False)
    assert r.returncode == 1 and "slurmctld: not running" in r.stdout and "not up" in r.stdout, r.stdout
    r = sh([LAUNCH / "slurm_local.sh", "restart"], env, check=False)
    assert r.returncode == 2 and "unknown action" in r.stderr


def test_local_dry_run(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_backend_optimization_level=0 --xla_force_host_platform_device_count=8"}
    out = sh([LAUNCH / "local.sh", "--dry-run", "-n", "3", "-d", "2", "-l", tmp_path, "--",
              "train", "--config", "c.py"], env).stdout
    assert "--xla_backend_optimization_level=0\\ --xla_force_host_platform_device_count=2" in out
    assert "device_count=8" not in out
    procs = [x for x in out.splitlines() if "jaxlm.cli train" in x]
    assert len(procs) == 3
    for i, x in enumerate(procs):
        assert f"--coordinator 127.0.0.1:PORT --num-processes 3 --process-id {i}" in x
        assert f"process-{i}.log" in x
    out = sh([LAUNCH / "local.sh", "--dry-run", "-n", "1", "-d", "8", "--", "train", "--config", "c.py"], env).stdout
    assert "jaxlm.cli train --config c.py >" in out and "--coordinator" not in out  # one process: no peers


def test_local_stops_the_others_when_one_fails(tmp_path):
    """Process 1 fails at once; process 0 would run for a minute: local.sh stops it and returns 1's status."""
    fake = tmp_path / "fakepython"
    fake.write_text('#!/usr/bin/env bash\necho "argv: $*"\n'
                    'if [[ "$*" == *"--process-id 1"* ]]; then sleep 2; echo boom; exit 3; fi\nexec sleep 60\n')  # 0 starts first
    fake.chmod(0o755)
    r = subprocess.run(["bash", str(LAUNCH / "local.sh"), "-n", "2", "-d", "1", "-q", "--python", str(fake),
                        "-l", str(tmp_path / "logs"), "--", "train", "--config", "c.py"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "process 1 failed (exit 3)" in r.stderr
    assert "boom" in (tmp_path / "logs" / "process-1.log").read_text()
    assert "-m jaxlm.cli train --config c.py --coordinator 127.0.0.1:" in (tmp_path / "logs" / "process-0.log").read_text()


def local(conf, logs, *extra, env=None):
    """launch/local.sh: 2 processes x 4 CPU devices running `jaxlm train` (started, not waited for)."""
    return subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "-n", "2", "-d", "4", "-q", "--timeout", "240",
                             "--python", sys.executable, "-l", str(logs), "--", "train", "--config", str(conf),
                             *extra], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc, logs):
    out = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, out + "".join(p.read_text()[-3000:] for p in sorted(Path(logs).glob("*.log")))
    return [(Path(logs) / f"process-{i}.log").read_text() for i in range(2)]


def test_local_two_processes_match_one(tmp_path):
    from jaxlm.train.loop import train

    cfg = tiny_config(tmp_path / "single", steps=3)
    cfg.parallel.update(data=1, fsdp=8)  # parameters sharded across both processes' devices
    cfg.data.update(num_shards=2, eval="")  # the same global batches for 1 or 2 processes; no eval
    cfg.checkpoint.update(every=2, async_save=True)
    cfg.log.peak_flops = 1e12  # skip the CPU FLOP/s measurement
    run = tmp_path / "multi" / "run"
    multi = cfg.copy_and_resolve_references()
    multi.log.dir = str(run)
    conf = write_config(multi, tmp_path / "cfg.py")
    # the resumed run below finds the programs compiled by the first one
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    proc = local(conf, tmp_path / "logs1", env=env)
    train(cfg)  # meanwhile, the reference in this process: 8 devices
    want = read_losses(tmp_path / "single" / "run" / "metrics.jsonl")
    finish(proc, tmp_path / "logs1")
    for name in ("metrics.jsonl", "metrics.p1.jsonl"):  # both processes computed the same losses
        got = read_losses(run / name)
        assert sorted(got) == [1, 2, 3]
        for s in got:
            assert abs(got[s] - want[s]) < 1e-5 * abs(want[s]), (name, s, got[s], want[s])

    # restore the step-2 checkpoint (written by both processes) and redo step 3
    shutil.rmtree(run / "checkpoints" / "3")
    outs = finish(local(conf, tmp_path / "logs2", "--resume", env=env), tmp_path / "logs2")
    assert "resumed from step 2" in outs[0]
    got = read_losses(run / "metrics.p1.jsonl")
    assert abs(got[3] - want[3]) < 1e-5 * abs(want[3])
