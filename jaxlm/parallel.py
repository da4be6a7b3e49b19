"""Meshes, logical-axis sharding and multi-host start-up.

Sharding is data: parameters and activations carry logical axis names, and one rules table
(`config.parallel.rules`) maps them onto the mesh axes (data, fsdp, tensor). Nothing here knows
about a particular model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm.model.config import ConfigError

log = logging.getLogger(__name__)
MESH_AXES = ("data", "fsdp", "tensor")


# ----------------------------------------------------------------------------- multi-host
def _env(*names):
    for n in names:
        if os.environ.get(n):
            return os.environ[n]
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start JAX's multi-controller runtime (`jax.distributed.initialize`) when this is one process of
    several; a no-op for a single process. Returns True when the distributed runtime is up.

    Order of precedence: explicit arguments (from flags or config), then the environment
    (JAXLM_COORDINATOR_ADDRESS / JAXLM_NUM_PROCESSES / JAXLM_PROCESS_ID, or JAX_* of the same names),
    then JAX's own cluster auto-detection for Cloud TPU pods and SLURM jobs.
    """
    if jax.distributed.is_initialized():
        return True
    addr = coordinator_address or _env("JAXLM_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    n = num_processes or int(_env("JAXLM_NUM_PROCESSES", "JAX_NUM_PROCESSES") or 0)
    pid = process_id if process_id is not None and process_id >= 0 else \
        int(_env("JAXLM_PROCESS_ID", "JAX_PROCESS_ID") or -1)
    if addr or n > 1:
        if not (addr and n > 1 and pid >= 0):
            raise ConfigError("a multi-process run needs all of parallel.coordinator_address, "
                              f"parallel.num_processes and parallel.process_id (got {addr!r}, {n}, {pid})")
        # CPU collectives across processes (the local multi-host path); ignored by GPU/TPU clients
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid)
    elif _detected_cluster():
        jax.distributed.initialize()  # JAX reads the TPU pod / SLURM environment itself
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _detected_cluster() -> bool:
    """A TPU pod slice with several hosts, or a SLURM job with several tasks."""
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return True
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


# ----------------------------------------------------------------------------- mesh
def mesh_shape(sizes: dict[str, int], num_devices: int) -> tuple[int, ...]:
    """Resolve -1 to the remaining devices; the product must equal num_devices."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"{num_devices} devices cannot be split into parallel "
                              f"{dict(zip(MESH_AXES, shape))}: {num_devices} is not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ConfigError(f"parallel data*fsdp*tensor = {'*'.join(map(str, shape))} = {int(np.prod(shape))} "
                          f"but there are {num_devices} devices")
    return tuple(shape)


def make_mesh(parallel_cfg, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types (pjit style)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape({a: parallel_cfg[a] for a in MESH_AXES}, len(devices))
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices)
    except Exception:  # noqa: BLE001 - fake CPU devices have no topology: plain order is right
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def check_batch(batch_size: int, mesh: Mesh, grad_accum: int = 1) -> None:
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    micro = batch_size // grad_accum
    if micro % dp:
        what = f"batch size {batch_size}" if grad_accum == 1 else \
            f"micro-batch {micro} (train.batch_size {batch_size} / train.grad_accum {grad_accum})"
        raise ConfigError(f"{what} not divisible by data*fsdp={dp}")


# ----------------------------------------------------------------------------- shardings
def rules_tuple(rules) -> tuple:
    return tuple((name, tuple(ax) if isinstance(ax, list | tuple) else ax) for name, ax in rules)


def logical_sharding(tree_of_specs, mesh: Mesh, rules):
    """Logical PartitionSpecs (leaves) -> NamedShardings on mesh."""
    return nn.logical_to_mesh_sharding(tree_of_specs, mesh, rules_tuple(rules))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Rows split over data*fsdp, the sequence replicated."""
    return NamedSharding(mesh, P(("data", "fsdp"), None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


class sharding_context:  # noqa: N801 - used as a context manager
    """`with sharding_context(mesh, rules):` -- mesh and logical rules for tracing jitted steps."""

    def __init__(self, mesh: Mesh, rules):
        self.mesh, self.rules = mesh, rules_tuple(rules)

    def __enter__(self):
        self._mesh_cm = jax.set_mesh(self.mesh)
        self._mesh_cm.__enter__()
        self._rules_cm = nn.logical_axis_rules(self.rules)
        self._rules_cm.__enter__()
        return self

    def __exit__(self, *exc):
        self._rules_cm.__exit__(*exc)
        self._mesh_cm.__exit__(*exc)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble the global batch from this process's rows (each process feeds its own devices)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
