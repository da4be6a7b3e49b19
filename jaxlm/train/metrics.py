"""Run logging (JSONL + TensorBoard + console) and the hardware peak table for MFU."""

from __future__ import annotations

import json
import math
import time

import jax
import numpy as np

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


class RunLog:
    """metrics.jsonl (every record) and TensorBoard scalars."""

    def __init__(self, directory, tensorboard: bool = True, resume: bool = False):
        from jaxlm.checkpoint import as_path

        self.dir = as_path(directory)
        self.tb = None
        self.dir.mkdir(parents=True, exist_ok=True)
        p = jax.process_index()
        # every process records what it computed (metrics.p1.jsonl, ...); process 0 also writes TensorBoard
        name = "metrics.jsonl" if p == 0 else f"metrics.p{p}.jsonl"
        self.remote = "://" in str(directory)
        if self.remote:  # object stores cannot append: keep the lines and rewrite the file at each flush
            path = self.dir / name
            self.lines = path.read_text().splitlines(keepends=True) if resume and path.exists() else []
            self.path = path
        else:
            self.jsonl = open(self.dir / name, "a" if resume else "w")  # noqa: SIM115
        if tensorboard and p == 0:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tensorboard"))

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
