"""Run logging (JSONL + TensorBoard + console), throughput windows, and the hardware peak table for MFU."""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np

from jaxlm.errors import TrainingError

# dense bf16 peak FLOP/s per device (per chip for TPUs)
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
    "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU v3": 123e12, "TPU v2": 45e12,
    "H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12,
    "V100": 125e12, "B200": 2250e12,
}


def measured_matmul_flops(n: int = 1024, repeats: int = 5) -> float:
    """Achieved fp32 matmul FLOP/s of one device: the CPU's practical peak."""
    x = jax.device_put(np.random.default_rng(0).standard_normal((n, n), np.float32), jax.local_devices()[0])
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops_per_device(override: float = 0.0) -> tuple[float, str]:
    """(peak FLOP/s, where it came from)."""
    if override:
        return override, "config"
    kind = jax.devices()[0].device_kind
    for name, flops in sorted(PEAK_FLOPS.items(), key=lambda kv: -len(kv[0])):
        if name.lower() in kind.lower():
            return flops, f"table ({kind})"
    return measured_matmul_flops(), f"measured fp32 matmul ({kind})"


class StepTimer:
    """Throughput and the windowed mean loss of the log lines.

    Time is measured from device-ready to device-ready: a window starts when the loop has waited for
    the previous step to finish (`start`, just before dispatching the window's first step) and ends
    when the metrics of its last step have been fetched (which waits for that step). Steps dispatched
    before a window started are not counted in it, so a host that falls behind never inflates
    tokens/s. The first step (compilation) is excluded from both throughput and the mean loss.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak: float):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak
        self.t0: float | None = None
        self.first = 0
        self.steps = 0
        self.losses: list[tuple[float, float]] = []
        self.seen_first = False

    def starts_window(self) -> bool:
        """Whether the step about to be dispatched should open a window."""
        return self.t0 is None and self.seen_first

    def start(self, first_step: int):
        """Open a window whose first step is `first_step` (about to be dispatched)."""
        self.t0 = time.perf_counter()
        self.first = first_step
        self.steps = 0

    def add(self, step: int, loss: float, tokens: float):
        """Record a finished step (the first, compile step, is left out)."""
        if not self.seen_first:
            self.seen_first = True
            return
        self.losses.append((loss, tokens))
        if self.t0 is not None and step >= self.first:
            self.steps += 1

    def window(self) -> dict:
        """Mean loss since the last log line and, when a window was timed, its throughput."""
        out = {}
        if self.losses:
            w = sum(n for _, n in self.losses)
            out["loss_avg"] = sum(v * n for v, n in self.losses) / max(w, 1)
            out["ppl"] = math.exp(min(out["loss_avg"], 50))
            self.losses = []
        if self.t0 is not None and self.steps:
            dt = time.perf_counter() - self.t0
            tps = self.steps * self.tokens_per_step / dt
            tflops = tps * self.flops_per_token / jax.device_count()
            out.update(tokens_per_s=tps, tflops_per_device=tflops / 1e12, mfu=tflops / self.peak)
            self.t0 = None
        return out

    def restart_after(self, step: int):
        """Drop the open window (evaluation or saving happened inside it)."""
        self.t0 = None


class Reporter:
    """Everything the loop tells the world about a step: the non-finite check, the console line,
    metrics.jsonl and TensorBoard (RunLog), the throughput window (StepTimer) and the progress bar.
    `console` is None on processes other than 0 (they log to their own metrics file only)."""

    def __init__(self, console, runlog, timer, progress, lr_at, every: int, last_step: int, check_data=None):
        self.console, self.runlog, self.timer, self.progress = console, runlog, timer, progress
        self.lr_at, self.every, self.last_step, self.check_data = lr_at, every, last_step, check_data

    def step(self, step: int, metrics, good: str) -> dict:
        """Fetch (waits for the step), check, record and print one step's metrics; returns the record.
        `good` names the last good checkpoint for the error a non-finite step raises."""
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not m.pop("finite", 1.0) or not math.isfinite(m["loss"]):
            raise TrainingError(f"non-finite loss or update at step {step} (loss {m['loss']}, gradient norm "
                                f"{m['grad_norm']}, update norm {m.get('update_norm')}); the update was not applied "
                                f"and training stopped ({good})",
                                hint="lower --config.train.lr or check the data of that step")
        rec = {"step": step, "loss": m["loss"], "lr": float(self.lr_at(step - 1)), "grad_norm": m["grad_norm"],
               **{k: v for k, v in m.items() if k not in ("loss", "grad_norm")}}
        self.timer.add(step, m["loss"], m["tokens"])
        at_log = step % self.every == 0 or step == self.last_step
        if at_log:
            rec.update(self.timer.window())
            if self.console:
                self.console.print(log_line(rec))
            if self.check_data:
                self.check_data()
        self.runlog.write(rec, flush=at_log)
        if self.progress:
            self.progress.update(step, m["loss"])
        return rec

    def evaluation(self, step: int, res: dict) -> dict:
        """Record and print an evaluation's scalars (and per-group ones)."""
        if not res:
            return res
        rec = {"step": step, **{k: v for k, v in res.items() if not isinstance(v, dict)}}
        self.runlog.write({**rec, **{f"{g}/{k}": v for g, gm in res.get("groups", {}).items() for k, v in gm.items()}},
                          prefix="eval")
        if self.console:
            self.console.print(f"[cyan]eval step {step}[/cyan] | " + " | ".join(
                f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in rec.items() if k != "step"))
        return res

    def close(self):
        if self.progress:
            self.progress.close()
        self.runlog.close()


def _fmt_tokens(x):
    return f"{x / 1e6:.2f}M" if x >= 1e6 else f"{x / 1e3:.1f}K" if x >= 1e3 else f"{x:.0f}"


def log_line(rec: dict) -> str:
    """The console line of a logged step."""
    msg = f"step {rec['step']:>6} | loss {rec.get('loss_avg', rec['loss']):.4f} | lr {rec['lr']:.2e} | " \
          f"gnorm {rec['grad_norm']:.3f}"
    if "tokens_per_s" in rec:
        msg += f" | {_fmt_tokens(rec['tokens_per_s'])} tok/s | {rec['tflops_per_device']:.3f} " \
               f"TFLOP/s/dev | MFU {rec['mfu']:.1%}"
    return msg


class RunLog:
    """metrics.jsonl (every record, each step once) and TensorBoard scalars.

    On resume from step k, records of steps after k (written by the run that was interrupted, and
    about to be redone) are dropped first, so every step appears once."""

    def __init__(self, directory, tensorboard: bool = True, resume_step: int | None = None):
        from jaxlm.checkpoint import as_path

        self.dir = as_path(directory)
        self.tb = None
        self.dir.mkdir(parents=True, exist_ok=True)
        p = jax.process_index()
        # every process records what it computed (metrics.p1.jsonl, ...); process 0 also writes TensorBoard
        name = "metrics.jsonl" if p == 0 else f"metrics.p{p}.jsonl"
        path = self.dir / name
        kept = []
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines(keepends=True):
                try:
                    step = json.loads(line).get("step", 0)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill
                if isinstance(step, int) and step <= resume_step:
                    kept.append(line if line.endswith("\n") else line + "\n")
        self.remote = "://" in str(directory)
        self.path = path
        if self.remote:  # object stores cannot append: keep the lines and rewrite the file at each flush
            self.lines = kept
        else:
            self.jsonl = open(path, "w")  # noqa: SIM115
            self.jsonl.writelines(kept)
            self.jsonl.flush()
        if tensorboard and p == 0:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=resume_step + 1 if resume_step else None)
    def write(self, record: dict, prefix: str = "train", flush: bool = True):
        line = json.dumps({k: _plain(v) for k, v in record.items()}) + "\n"
        if self.remote:
            self.lines.append(line)
            if flush:
                self.path.write_text("".join(self.lines))
        else:
            self.jsonl.write(line)
            self.jsonl.flush()
        if self.tb is not None and "step" in record:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float | np.floating | np.integer) and math.isfinite(v):
                    self.tb.add_scalar(f"{prefix}/{k}", float(v), int(record["step"]))

    def close(self):
        if self.remote:
            self.path.write_text("".join(self.lines))
        else:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()


def _plain(v):
    if isinstance(v, np.generic | jax.Array):
        v = np.asarray(v).item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v
