"""Meshes, logical-axis sharding and multi-host start-up.

Sharding is data: parameters and activations carry logical axis names, and one rules table
(`config.parallel.rules`) maps them onto the mesh axes (data, fsdp, tensor). Nothing here knows
about a particular model.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from typing import ClassVar

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxlm import schema
from jaxlm.errors import ConfigError
from jaxlm.schema import field

log = logging.getLogger(__name__)
MESH_AXES = ("data", "fsdp", "tensor")

# logical axis -> mesh axis (or axes); for each array dimension the first rule whose mesh axes are
# still unused in that array wins, so activations' 'embed' stays replicated when 'batch' took fsdp.
DEFAULT_RULES = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("length", None),
    ("head_dim", None),
    ("layers", None),
)


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    SECTION: ClassVar[str] = "parallel"
    data: int = field(-1, "data-parallel mesh axis size (within a slice); -1 = the remaining devices", ge=-1)
    fsdp: int = field(1, "fully-sharded (ZeRO-3) mesh axis size (within a slice); -1 = the remaining devices", ge=-1)
    tensor: int = field(1, "tensor-parallel mesh axis size; -1 = the remaining devices", ge=-1)
    dcn_data: int = field(1, "data-parallel factor across slices (TPU multislice) or node groups; the data "
                             "axis is data*dcn_data", ge=1)
    dcn_fsdp: int = field(1, "fsdp factor across slices or node groups; the fsdp axis is fsdp*dcn_fsdp", ge=1)
    rules: tuple = field(DEFAULT_RULES, "logical axis -> mesh axes table (first unused match wins)")
    coordinator_address: str = field("", "jax.distributed coordinator host:port ('' = auto-detect or single process)")
    num_processes: int = field(0, "processes in the job (0 = auto-detect)", ge=0)
    process_id: int = field(-1, "this process's index (-1 = auto-detect)", ge=-1)

    def __post_init__(self):
        schema.check(self)
        for axis in MESH_AXES:
            if getattr(self, axis) == 0:
                raise ConfigError(f"parallel.{axis} must be -1 or >= 1, got 0")
        if [self.data, self.fsdp, self.tensor].count(-1) > 1:
            raise ConfigError("only one of parallel.data/fsdp/tensor may be -1")


def _sizes(parallel_cfg) -> dict:
    """The section as a plain dict (a ParallelConfig, a ConfigDict or a dict of sizes)."""
    if dataclasses.is_dataclass(parallel_cfg):
        return {f.name: getattr(parallel_cfg, f.name) for f in dataclasses.fields(parallel_cfg)}
    return dict(parallel_cfg.items()) if isinstance(parallel_cfg, Mapping) or hasattr(parallel_cfg, "items") \
        else dict(parallel_cfg)


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
    then the cluster the process runs in: a SLURM job step with several tasks, a Cloud TPU VM (pod
    slice or multislice, read by JAX from the TPU metadata) or a GKE TPU job.
    JAXLM_DISTRIBUTED=0 turns the detection off, =1 forces `jax.distributed.initialize()` (JAX's own
    detection: Open MPI, Kubernetes, ...).
    """
    if jax.distributed.is_initialized():
        return True
    addr = coordinator_address or _env("JAXLM_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")
    n = num_processes or int(_env("JAXLM_NUM_PROCESSES", "JAX_NUM_PROCESSES", "JAX_PROCESS_COUNT") or 0)
    pid = process_id if process_id is not None and process_id >= 0 else \
        int(_env("JAXLM_PROCESS_ID", "JAX_PROCESS_ID") or -1)
    cluster = None
    if addr or n > 1:
        if not (addr and n > 1 and pid >= 0):
            raise ConfigError("a multi-process run needs all of parallel.coordinator_address, "
                              f"parallel.num_processes and parallel.process_id (got {addr!r}, {n}, {pid})")
    else:
        cluster = detected_cluster()
        if not cluster:
            return False
    # CPU collectives across processes (the local multi-host path); ignored by GPU/TPU clients
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if not cluster:
        # everything is given: JAX's cluster detection must not second-guess it (under SLURM it would
        # limit a one-task-per-node process to GPU 0). JAX_LOCAL_DEVICE_IDS is still honoured.
        jax.distributed.initialize(coordinator_address=addr, num_processes=n, process_id=pid,
                                   cluster_detection_method="deactivate")
    elif cluster == "slurm":
        jax.distributed.initialize(**slurm_params())
    else:
        jax.distributed.initialize()  # JAX reads the TPU metadata / environment itself
    log.info("jax.distributed: process %d of %d, %d local devices of %d", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def detected_cluster() -> str | None:
    """'slurm', 'tpu', 'forced' or None: where `initialize()` without addresses finds its peers."""
    mode = os.environ.get("JAXLM_DISTRIBUTED", "").lower()
    if mode in ("0", "false", "off", "no"):
        return None
    if mode in ("1", "true", "on", "yes"):
        return "forced"
    if "SLURM_JOB_ID" in os.environ and "SLURM_PROCID" in os.environ and \
            int(_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    hosts = _env("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES") or ""
    if "," in hosts or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS") or _on_cloud_tpu_vm():
        return "tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    """TPU chips on this host's PCI bus (what JAX checks before reading the TPU VM metadata)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - a JAX without this helper: no TPU detection, flags still work
        return False


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[003-004,7],cpu1' -> 'gpu003', 'a,b' -> 'a'."""
    i = next((k for k, ch in enumerate(nodelist) if ch in ",["), len(nodelist))
    if i == len(nodelist) or nodelist[i] == ",":
        return nodelist[:i]
    rest = nodelist[i + 1:]
    j = next((k for k, ch in enumerate(rest) if ch in ",-]"), len(rest))
    return nodelist[:i] + rest[:j]


def slurm_params() -> dict:
    """jax.distributed.initialize arguments for this SLURM task. One task per node sees all of the
    node's GPUs; with several tasks per node each task takes GPU SLURM_LOCALID, unless SLURM already
    gave it a single one (CUDA_VISIBLE_DEVICES)."""
    nodes = _env("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST") or "localhost"
    port = os.environ.get("JAX_COORDINATOR_PORT") or str(int(os.environ["SLURM_JOB_ID"]) % 4096 + 61440)
    n = int(_env("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS"))
    n_nodes = int(_env("SLURM_STEP_NUM_NODES", "SLURM_JOB_NUM_NODES", "SLURM_NNODES") or 1)
    out = dict(coordinator_address=f"{_first_host(nodes)}:{port}", num_processes=n,
               process_id=int(os.environ["SLURM_PROCID"]), cluster_detection_method="deactivate")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if n > n_nodes and ("," in visible or not visible) and not os.environ.get("JAX_LOCAL_DEVICE_IDS"):
        out["local_device_ids"] = [int(os.environ.get("SLURM_LOCALID", 0))]
    return out


# ----------------------------------------------------------------------------- mesh
DCN_FIELDS = {"data": "dcn_data", "fsdp": "dcn_fsdp"}  # mesh axis -> its across-slice factor


def mesh_shape(sizes: dict[str, int], num_devices: int, where: str = "") -> tuple[int, ...]:
    """Resolve -1 to the remaining devices; the product must equal num_devices."""
    shape = [int(sizes[a]) for a in MESH_AXES]
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if num_devices % known:
            raise ConfigError(f"{num_devices} devices{where} cannot be split into parallel "
                              f"{dict(zip(MESH_AXES, shape))}: {num_devices} is not divisible by {known}")
        shape[shape.index(-1)] = num_devices // known
    if int(np.prod(shape)) != num_devices:
        raise ConfigError(f"parallel data*fsdp*tensor = {'*'.join(map(str, shape))} = {int(np.prod(shape))} "
                          f"but there are {num_devices} devices{where}")
    return tuple(shape)


def dcn_shape(parallel_cfg) -> tuple[int, ...]:
    """The across-slice factor of each mesh axis (1 where the config has none)."""
    parallel_cfg = _sizes(parallel_cfg)
    shape = []
    for a in MESH_AXES:
        v = parallel_cfg.get(DCN_FIELDS[a], 1) if a in DCN_FIELDS else 1
        if not isinstance(v, int) or v < 1:
            raise ConfigError(f"parallel.{DCN_FIELDS[a]} must be an integer >= 1, got {v!r}")
        shape.append(v)
    return tuple(shape)


def _ici_grid(shape, devices) -> np.ndarray:
    """Devices of one slice (or one group of hosts) arranged along the fast network."""
    from jax.experimental import mesh_utils

    for split in (False, True):
        try:
            return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=split)
        except Exception:  # noqa: BLE001 - retry, then fall back below
            continue
    if devices[0].platform == "tpu":
        log.warning("no topology-aware TPU mesh of shape %s; using the plain device order", shape)
    return np.asarray(devices, dtype=object).reshape(shape)


def _slices(devices) -> int:
    ids = {getattr(d, "slice_index", None) for d in devices}
    return 1 if None in ids else len(ids)


def device_grid(parallel_cfg, devices: Sequence) -> np.ndarray:
    """The devices arranged as the (data, fsdp, tensor) mesh: axis sizes ici * dcn.

    `parallel.data/fsdp/tensor` are the sizes within a slice (the fast ICI / NVLink network) and
    `parallel.dcn_data/dcn_fsdp` the factors across slices (the slower data-centre network). Along
    each axis the slice index is the outer one: with dcn_data=2 the first half of the data axis is
    slice 0. Slices are TPU slices when the devices carry several `slice_index` values; otherwise
    contiguous groups of processes (GPU nodes, local processes) of equal size.
    """
    devices = list(devices)
    parallel_cfg = _sizes(parallel_cfg)
    dcn = dcn_shape(parallel_cfg)
    n = int(np.prod(dcn))
    slices = _slices(devices)
    if n == 1:
        if slices > 1:
            raise ConfigError(f"the devices span {slices} TPU slices: set parallel.dcn_data and/or "
                              f"parallel.dcn_fsdp so that dcn_data*dcn_fsdp = {slices}")
        return _ici_grid(mesh_shape({a: parallel_cfg[a] for a in MESH_AXES}, len(devices)), devices)
    what = f"parallel.dcn_data*dcn_fsdp = {dcn[0]}*{dcn[1]} = {n}"
    if len(devices) % n:
        raise ConfigError(f"{what} does not divide the {len(devices)} devices")
    ici = mesh_shape({a: parallel_cfg[a] for a in MESH_AXES}, len(devices) // n, " per slice")
    if slices > 1:
        if slices != n:
            raise ConfigError(f"{what} but the devices span {slices} TPU slices")
        from jax.experimental import mesh_utils

        for split in (False, True):
            try:
                return mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=split)
            except ValueError as e:
                err = e
        raise ConfigError(f"cannot lay out parallel {dict(zip(MESH_AXES, ici))} within each slice: {err}")
    procs = sorted({d.process_index for d in devices})
    if len(procs) % n:
        raise ConfigError(f"{what} but the {len(procs)} process(es) cannot be split into {n} equal "
                          "groups (with no TPU slices, each dcn group is a set of processes, e.g. a node)")
    group = {p: i * n // len(procs) for i, p in enumerate(procs)}
    blocks = np.empty(n, dtype=object)
    for g in range(n):
        blocks[g] = _ici_grid(ici, [d for d in devices if group[d.process_index] == g])
    return np.block(blocks.reshape(dcn).tolist())


def make_mesh(parallel_cfg, devices: Sequence | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over `devices` (default: all), with Auto axis types (pjit style).
    `parallel_cfg` is the `parallel` config section or a dict with data/fsdp/tensor (dcn_* optional)."""
    devices = list(devices if devices is not None else jax.devices())
    grid = device_grid(parallel_cfg, devices)
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
    """Rows (the leading axis of any rank) split over data*fsdp; everything else replicated."""
    return NamedSharding(mesh, P(("data", "fsdp")))


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


def initialize_from(pa: ParallelConfig) -> bool:
    """`initialize` with the parallel section's coordinator settings."""
    return initialize(pa.coordinator_address or None, pa.num_processes or None, pa.process_id)


def local_rows(batch: dict, rows: int | None = None, keys: Sequence[str] | None = None) -> dict:
    """This process's share of a global batch that every process holds whole: rows
    [p * rows / P, (p + 1) * rows / P) of each array (rows: the global row count, default the
    arrays' length), optionally only `keys`."""
    keys = list(keys) if keys is not None else list(batch)
    rows = rows if rows is not None else len(batch[keys[0]])
    per = rows // jax.process_count()
    lo = jax.process_index() * per
    return {k: batch[k][lo:lo + per] for k in keys}


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble the global batch from this process's rows (each process feeds its own devices)."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}
