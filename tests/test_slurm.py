"""launch/gpu_slurm.sh on a real SLURM cluster: a single node brought up on this machine by
launch/slurm_local.sh (slurmctld + slurmd + munged; installed with apt when missing, which needs root).

Each job runs 2 CPU tasks x 2 fake devices joined by jax.distributed, like `launch/local.sh -n 2 -d 2`:
- its per-step losses equal the local 2-process run's, and every task writes its own log;
- preempted (`scancel --signal=TERM`, then `scontrol requeue`), the job requeues, resumes by itself
  and ends with the uninterrupted run's losses, no step logged twice;
- a task that fails on a bad config fails the job at once, its one-line error in the batch log.

The cluster: one already up in JAXLM_SLURM_PREFIX (default /tmp/jaxlm-slurm; CI brings it up in a
step of its own), else brought up here and taken down at the end. When it cannot come up (not
root, no apt) the tests are skipped with the reason, or fail with JAXLM_SLURM_REQUIRED=1 (CI).
JAXLM_SLURM=0 skips them without trying.
"""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, read_losses, tiny_config, write_config

pytestmark = pytest.mark.slurm

LAUNCH = REPO / "launch"
PREFIX = Path(os.environ.get("JAXLM_SLURM_PREFIX", "/tmp/jaxlm-slurm"))
STEPS = 30
DEVICES = 2  # per task
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
         "PREEMPTED"}


def _no_cluster(reason):
    if os.environ.get("JAXLM_SLURM_REQUIRED", "") not in ("", "0"):
        pytest.fail(f"JAXLM_SLURM_REQUIRED is set but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def cluster():
    """The environment that reaches the local cluster (SLURM_CONF); brought up here when none is up."""
    if os.environ.get("JAXLM_SLURM", "") == "0":
        pytest.skip("JAXLM_SLURM=0")
    env = {**os.environ, "JAXLM_SLURM_PREFIX": str(PREFIX), "SLURM_CONF": str(PREFIX / "etc" / "slurm.conf")}
    script = ["bash", str(LAUNCH / "slurm_local.sh")]
    started = False
    if subprocess.run([*script, "status"], env=env, capture_output=True, timeout=60).returncode != 0:
        t = time.monotonic()
        up = subprocess.run([*script, "up"], env=env, capture_output=True, text=True, timeout=900)
        if up.returncode != 0:
            lines = [x for x in up.stderr.splitlines() if "slurm_local.sh" in x] or up.stderr.splitlines() or ["?"]
            _no_cluster(f"no SLURM cluster: launch/slurm_local.sh up failed: {lines[-1]}")
        print(f"slurm_local.sh up: {time.monotonic() - t:.0f}s", file=sys.stderr)
        started = True
    yield env
    if started:
        subprocess.run([*script, "down"], env=env, capture_output=True, timeout=300)


@pytest.fixture(scope="module")
def setup(cluster, tmp_path_factory):
    """The config file, the jobs' environment, and the local 2-process reference run, started here and
    running while the first SLURM job does (`reference()` waits for its losses)."""
    tmp = tmp_path_factory.mktemp("slurm")
    cfg = tiny_config(None, steps=STEPS, batch_size=4)
    cfg.model.num_layers = 1
    cfg.data.update(num_shards=2, eval="")  # the same global batches however many processes read them
    cfg.checkpoint.update(every=10, keep=3)
    cfg.log.peak_flops = 1e12  # skip the CPU FLOP/s measurement
    conf = write_config(cfg, tmp / "cfg.py")
    xla = re.sub(r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")).split()
    env = {**cluster, "XLA_FLAGS": " ".join([*xla, f"--xla_force_host_platform_device_count={DEVICES}"]),
           "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1",
           # every run after the first finds its programs compiled
           "JAX_COMPILATION_CACHE_DIR": str(tmp / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    if not (Path(sys.executable).parent / "activate").exists():  # else the jobs source it (gpu_slurm.sh --env)
        env.update(JAXLM_BIN=str(Path(sys.executable).parent / "jaxlm"), JAXLM_PYTHON=sys.executable)
    ref = tmp / "local"
    local_env = {**os.environ, **{k: v for k, v in env.items() if k.startswith("JAX_")}}  # local.sh sets XLA_FLAGS
    proc = subprocess.Popen(["bash", str(LAUNCH / "local.sh"), "-n", "2", "-d", str(DEVICES), "-q", "--timeout", "900",
                             "--python", sys.executable, "-l", str(ref / "logs"), "--", "train", "--config", str(conf),
                             f"--config.log.dir={ref / 'run'}"],
                            cwd=REPO, env=local_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def reference():
        out = proc.communicate(timeout=900)[0]
        assert proc.returncode == 0, out + "".join(p.read_text()[-2000:] for p in sorted((ref / "logs").glob("*.log")))
        return [read_losses(ref / "run" / name) for name in ("metrics.jsonl", "metrics.p1.jsonl")]

    s = dict(tmp=tmp, conf=conf, env=env, reference=reference, jobs=[])
    yield s
    if proc.poll() is None:
        proc.terminate()  # local.sh stops its processes
        proc.wait(timeout=60)
    if s["jobs"]:  # a failed test may have left its job running
        subprocess.run(["scancel", *map(str, s["jobs"])], env=env, capture_output=True, timeout=60)


def submit(s, name, *args, requeue=False):
    """launch/gpu_slurm.sh: 1 node x 2 CPU tasks running `jaxlm train --config CFG ARGS`; the job id."""
    activate = Path(sys.executable).parent / "activate"
    cmd = ["bash", str(LAUNCH / "gpu_slurm.sh"), "--nodes", "1", "--gpus-per-node", "0", "--tasks-per-node", "2",
           "--time", "20", "--job-name", name, "--logs", str(s["tmp"] / "logs"),
           *(["--env", str(activate)] if activate.exists() else []), *(["--requeue"] if requeue else []),
           "--", "--config", str(s["conf"]), f"--config.log.dir={s['tmp'] / name}", *args]
    r = subprocess.run(cmd, cwd=REPO, env=s["env"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    s["jobs"].append(int(re.search(r"Submitted batch job (\d+)", r.stdout).group(1)))
    return s["jobs"][-1]


def scontrol(s, *args):
    return subprocess.run(["scontrol", *args], env=s["env"], capture_output=True, text=True, timeout=30)


def job_info(s, job) -> dict:
    """`scontrol show job`: JobState, Reason, Restarts, ExitCode, ..."""
    out = scontrol(s, "show", "job", "-o", str(job)).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def logs_of(s, job) -> str:
    d = s["tmp"] / "logs"
    files = [d / f"slurm-{job}.out", *sorted((d / f"slurm-{job}").glob("task-*.log"))]
    return "".join(f"\n--- {p.name}\n{p.read_text()[-3000:]}" for p in files if p.exists())


def node_idle(s) -> bool:
    r = subprocess.run(["sinfo", "-h", "-n", "localhost", "-o", "%T"], env=s["env"], capture_output=True, text=True,
                       timeout=30)
    return r.stdout.strip() == "idle"


def wait(s, job, until, what, timeout=600):
    """Poll the job until `until(info)`; fail with its logs when it ends first or time runs out.

    A requeued job may not start again for 2 minutes (BeginTime: SLURM's credential lifetime, so that
    no slurmd mistakes the new run for the killed one). Once the old run is gone (the node idle) and a
    few seconds have passed, lift that hold: sooner, the new run is refused and the job fails."""
    deadline = time.monotonic() + timeout
    held_since = None
    while True:
        info = job_info(s, job)
        if until(info):
            return info
        state = info.get("JobState")
        if state in ENDED:
            pytest.fail(f"job {job} ended ({state}, exit {info.get('ExitCode')}) before {what}:{logs_of(s, job)}")
        held = state == "PENDING" and info.get("Reason") == "BeginTime" and int(info.get("Restarts", 0)) > 0
        if not held or not node_idle(s):
            held_since = None
        elif held_since is None:
            held_since = time.monotonic()
        elif time.monotonic() - held_since > 3:
            scontrol(s, "update", f"JobId={job}", "StartTime=now")
            held_since = None
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job)], env=s["env"], timeout=30)
            pytest.fail(f"job {job} still {state} after {timeout}s, waiting for {what}:{logs_of(s, job)}")
        time.sleep(0.5)


def ended(info):
    return info.get("JobState") in ENDED


def last_step(run: Path) -> int:
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [json.loads(x)["step"] for x in lines if x.endswith("}")]
    return max(steps, default=0)


def steps_logged(path: Path) -> list[int]:
    return [r["step"] for r in map(json.loads, path.read_text().splitlines()) if "lr" in r]


def assert_losses_equal(got: dict, want: dict, name: str):
    assert sorted(got) == list(range(1, STEPS + 1)), (name, sorted(got))
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-5 * abs(want[step]), (name, step, got[step], want[step])


def test_sbatch_two_cpu_tasks_match_local_run(setup):
    s = setup
    job = submit(s, "plain")
    info = wait(s, job, ended, "it ended")
    assert info["JobState"] == "COMPLETED", logs_of(s, job)
    task_dir = s["tmp"] / "logs" / f"slurm-{job}"
    assert sorted(p.name for p in task_dir.glob("task-*.log")) == ["task-0.log", "task-1.log"]  # one log per task
    log0 = (task_dir / "task-0.log").read_text()
    assert "4 cpu devices, 2 process(es)" in log0 and f"step {STEPS:6d} | loss" in log0, log0
    assert [(task_dir / f"task-{t}.exit").read_text().strip() for t in range(2)] == ["0", "0"]
    assert f"job {job}, 2 task(s) on 1 node(s)" in (s["tmp"] / "logs" / f"slurm-{job}.out").read_text()
    want = s["reference"]()
    run = s["tmp"] / "plain"
    for i, name in enumerate(("metrics.jsonl", "metrics.p1.jsonl")):  # both processes logged every step
        assert_losses_equal(read_losses(run / name), want[i], name)


def test_preempted_job_requeues_and_resumes_exactly(setup):
    s = setup
    run = s["tmp"] / "preempted"
    job = submit(s, "preempted", requeue=True)
    task0 = s["tmp"] / "logs" / f"slurm-{job}" / "task-0.log"

    # 1. SIGTERM to the tasks (what SLURM sends before the time limit or on preemption): they save a
    #    checkpoint and stop; the batch script requeues the job, which resumes from that checkpoint
    wait(s, job, lambda i: last_step(run) >= 3, "training reached step 3")
    subprocess.run(["scancel", "--signal=TERM", str(job)], env=s["env"], check=True, timeout=30)
    wait(s, job, lambda i: int(i.get("Restarts", 0)) >= 1 and i["JobState"] == "RUNNING", "the requeued run")
    stopped = int(re.search(r"stopped at step (\d+) by SIGTERM", task0.read_text()).group(1))
    assert stopped < STEPS
    wait(s, job, lambda i: f"resumed from step {stopped}" in task0.read_text(), f"resuming from step {stopped}")

    # 2. `scontrol requeue` (what an admin, or a preempting job with PreemptMode=REQUEUE, does): SLURM
    #    sends the tasks SIGTERM (SIGKILL KillWait seconds later) and requeues the job itself; the
    #    batch script must not requeue it a second time
    wait(s, job, lambda i: last_step(run) >= stopped + 3, f"step {stopped + 3}")
    assert scontrol(s, "requeue", str(job)).returncode == 0
    wait(s, job, lambda i: int(i.get("Restarts", 0)) >= 2 and i["JobState"] == "RUNNING", "the second requeued run")
    info = wait(s, job, ended, "it ended")
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", (info, logs_of(s, job))

    batch = (s["tmp"] / "logs" / f"slurm-{job}.out").read_text()
    assert "the tasks stopped on SIGTERM (exit 143); requeueing job" in batch, batch
    assert f"restart 1 of job {job}: resuming from step {stopped} in" in batch, batch
    assert f"restart 2 of job {job}: resuming from step" in batch, batch
    assert task0.read_text().count("resumed from step") == 2
    want = s["reference"]()
    for i, name in enumerate(("metrics.jsonl", "metrics.p1.jsonl")):
        steps = steps_logged(run / name)
        assert len(steps) == len(set(steps)) == STEPS, (name, steps)  # no step logged twice
        assert_losses_equal(read_losses(run / name), want[i], name)


def test_failing_task_fails_the_job_with_its_error(setup):
    s = setup
    t = time.monotonic()
    job = submit(s, "bad", "--config.model.num_heads=3")  # not divisible by num_kv_heads=2
    info = wait(s, job, ended, "it ended", timeout=300)
    assert info["JobState"] == "FAILED" and info["ExitCode"].startswith("2:"), (info, logs_of(s, job))
    batch = (s["tmp"] / "logs" / f"slurm-{job}.out").read_text()
    assert re.search(r"gpu_slurm.sbatch: task \d: error: model.num_heads 3 is not divisible by model.num_kv_heads 2",
                     batch), batch
    assert "stopped on SIGTERM" not in batch  # the task that srun stopped after the failure does not count
    assert time.monotonic() - t < 240  # failed, did not hang
