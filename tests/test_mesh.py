"""Hybrid (within-slice x across-slice) meshes and multi-host start-up, on fake devices and a fake
jax.distributed: the device order along each axis, the axis sizes, and the errors that name the field."""

import dataclasses

import jax
import numpy as np
import pytest
from conftest import tiny_config

from jaxlm import config as run_config
from jaxlm import parallel
from jaxlm.model.config import ConfigError


@dataclasses.dataclass(frozen=True)
class FakeDevice:
    id: int
    process_index: int
    slice_index: int | None = None
    platform: str = "cpu"
    device_kind: str = "fake"
    coords: tuple = (0, 0, 0)
    core_on_chip: int = 0


def fleet(slices=0, processes=1, per_process=4, platform="cpu", kind="fake"):
    """Devices numbered like a real fleet: slice-major, then process, then local device."""
    out = []
    for s in range(max(slices, 1)):
        for p in range(processes):
            for k in range(per_process):
                i = len(out)
                out.append(FakeDevice(i, s * processes + p, s if slices else None, platform, kind,
                                      (k % 2, k // 2 + 2 * p, 0)))
    return out


def cfg(data=1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1):
    return dict(data=data, fsdp=fsdp, tensor=tensor, dcn_data=dcn_data, dcn_fsdp=dcn_fsdp)


def slice_of(grid):
    return np.vectorize(lambda d: d.slice_index)(grid)


def test_two_slices_data_across_slices():
    devs = fleet(slices=2, processes=1, per_process=4)
    grid = parallel.device_grid(cfg(data=1, fsdp=4, dcn_data=2), devs)
    assert grid.shape == (2, 4, 1)
    np.testing.assert_array_equal(slice_of(grid)[:, :, 0], [[0] * 4, [1] * 4])
    assert sorted(d.id for d in grid.flat) == list(range(8))

    grid = parallel.device_grid(cfg(data=2, fsdp=2, dcn_data=2), devs)
    assert grid.shape == (4, 2, 1)
    s = slice_of(grid)
    assert (s[:2] == 0).all() and (s[2:] == 1).all()  # the first half of the data axis is slice 0


def test_two_slices_fsdp_across_slices_and_ici_minus_one():
    devs = fleet(slices=2, processes=2, per_process=4)  # 2 slices x 2 hosts x 4 chips
    grid = parallel.device_grid(cfg(data=-1, fsdp=4, dcn_fsdp=2), devs)
    assert grid.shape == (2, 8, 1)  # data resolved per slice: 8 / 4
    s = slice_of(grid)
    assert (s[:, :4] == 0).all() and (s[:, 4:] == 1).all()


def test_four_slices_two_by_two():
    devs = fleet(slices=4, processes=1, per_process=2)
    grid = parallel.device_grid(cfg(data=1, fsdp=2, dcn_data=2, dcn_fsdp=2), devs)
    assert grid.shape == (2, 4, 1)
    np.testing.assert_array_equal(slice_of(grid)[:, :, 0], [[0, 0, 1, 1], [2, 2, 3, 3]])


def test_tpu_topology_within_each_slice():
    """Fake TPU v4 chips (2x2x1 per slice): mesh_utils' topology-aware path, slices outermost."""
    devs = fleet(slices=2, processes=1, per_process=4, platform="tpu", kind="TPU v4")
    grid = parallel.device_grid(cfg(data=1, fsdp=2, tensor=2, dcn_data=2), devs)
    assert grid.shape == (2, 2, 2)
    assert (slice_of(grid)[0] == 0).all() and (slice_of(grid)[1] == 1).all()
    for s in range(2):  # each slice's 2x2 block holds that slice's four chips
        assert {d.coords[:2] for d in grid[s].flat} == {(0, 0), (1, 0), (0, 1), (1, 1)}


def test_gpu_nodes_are_groups_of_processes():
    # 2 nodes x 8 GPUs, one process per GPU (16 processes): dcn groups are processes 0-7 and 8-15
    devs = fleet(processes=16, per_process=1, platform="gpu", kind="fake-gpu")
    grid = parallel.device_grid(cfg(data=1, fsdp=8, dcn_data=2), devs)
    assert grid.shape == (2, 8, 1)
    procs = np.vectorize(lambda d: d.process_index)(grid)[:, :, 0]
    np.testing.assert_array_equal(procs, [list(range(8)), list(range(8, 16))])
    # one process per node
    grid = parallel.device_grid(cfg(data=2, fsdp=4, dcn_data=2), fleet(processes=2, per_process=8))
    procs = np.vectorize(lambda d: d.process_index)(grid)
    assert grid.shape == (4, 4, 1) and (procs[:2] == 0).all() and (procs[2:] == 1).all()


def test_without_dcn_the_plain_mesh_is_unchanged():
    devs = fleet(processes=2, per_process=4)
    grid = parallel.device_grid(cfg(data=2, fsdp=4), devs)
    np.testing.assert_array_equal(np.vectorize(lambda d: d.id)(grid)[:, :, 0], [[0, 1, 2, 3], [4, 5, 6, 7]])


@pytest.mark.parametrize("sizes, devs, message", [
    (cfg(data=1, fsdp=4), fleet(slices=2), "span 2 TPU slices: set parallel.dcn_data"),
    (cfg(data=1, fsdp=2, dcn_data=4), fleet(slices=2), r"dcn_data\*dcn_fsdp = 4\*1 = 4 but the devices span 2"),
    (cfg(data=1, fsdp=8, dcn_data=2), fleet(slices=2), "there are 4 devices per slice"),
    (cfg(data=1, fsdp=2, dcn_data=3), fleet(processes=2, per_process=3), r"2 process\(es\) cannot be split into 3"),
    (cfg(dcn_fsdp=0), fleet(), "parallel.dcn_fsdp must be an integer >= 1"),
])
def test_mesh_errors_name_the_field(sizes, devs, message):
    with pytest.raises(ConfigError, match=message):
        parallel.device_grid(sizes, devs)


def test_config_fields_and_validation():
    c = tiny_config()
    assert (c.parallel.dcn_data, c.parallel.dcn_fsdp) == (1, 1)
    assert "parallel.dcn_data" in run_config.help_table()
    run_config.apply_overrides(c, ["--config.parallel.dcn_data=0"])
    with pytest.raises(ConfigError, match="parallel.dcn_data must be >= 1"):
        run_config.build(c)


def test_real_mesh_with_process_groups():
    """make_mesh on this process's 8 CPU devices (one process): dcn needs as many groups as processes."""
    mesh = parallel.make_mesh(cfg(data=2, fsdp=2, tensor=2))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ConfigError, match="1 process"):
        parallel.make_mesh(cfg(data=1, fsdp=4, dcn_data=2))


# ----------------------------------------------------------------------------- start-up
CLUSTER_VARS = ("JAXLM_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "JAXLM_NUM_PROCESSES",
                "JAX_NUM_PROCESSES", "JAX_PROCESS_COUNT", "JAXLM_PROCESS_ID", "JAX_PROCESS_ID",
                "JAXLM_DISTRIBUTED", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS",
                "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST", "SLURM_STEP_NUM_NODES",
                "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_LOCALID", "CUDA_VISIBLE_DEVICES",
                "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_PORT", "TPU_WORKER_HOSTNAMES",
                "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")


@pytest.fixture
def fake_distributed(monkeypatch):
    """Record jax.distributed.initialize calls instead of making them; a clean environment."""
    for k in CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
    monkeypatch.setattr(parallel, "_on_cloud_tpu_vm", lambda: False)
    return calls


def test_explicit_flags_bypass_cluster_detection(fake_distributed, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "7")  # inside SLURM, but the launcher gave everything
    assert parallel.initialize("node1:1234", 16, 3)
    assert fake_distributed == [dict(coordinator_address="node1:1234", num_processes=16, process_id=3,
                                     cluster_detection_method="deactivate")]


def test_environment_variables(fake_distributed, monkeypatch):
    monkeypatch.setenv("JAXLM_COORDINATOR_ADDRESS", "127.0.0.1:999")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    assert parallel.initialize()
    assert fake_distributed[0]["process_id"] == 1 and fake_distributed[0]["num_processes"] == 2


@pytest.mark.parametrize("tasks, nodes, visible, local_ids", [
    ("2", "2", "0,1,2,3,4,5,6,7", None),  # one task per node: all 8 GPUs
    ("16", "2", "0,1,2,3,4,5,6,7", [5]),  # one task per GPU: GPU SLURM_LOCALID
    ("16", "2", "5", None),               # SLURM bound one GPU to the task already
])
def test_slurm_detection(fake_distributed, monkeypatch, tasks, nodes, visible, local_ids):
    env = {"SLURM_JOB_ID": "4242", "SLURM_PROCID": "13", "SLURM_NTASKS": tasks, "SLURM_LOCALID": "5",
           "SLURM_STEP_NODELIST": "gpu[007-008]", "SLURM_STEP_NUM_NODES": nodes,
           "CUDA_VISIBLE_DEVICES": visible}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert parallel.detected_cluster() == "slurm"
    assert parallel.initialize()
    (call,) = fake_distributed
    assert call["coordinator_address"] == f"gpu007:{4242 % 4096 + 61440}"
    assert (call["num_processes"], call["process_id"]) == (int(tasks), 13)
    assert call.get("local_device_ids") == local_ids


def test_tpu_detection(fake_distributed, monkeypatch):
    assert parallel.initialize() is False  # nothing here: one process
    monkeypatch.setattr(parallel, "_on_cloud_tpu_vm", lambda: True)  # a Cloud TPU VM (gcloud ssh)
    assert parallel.detected_cluster() == "tpu"
    monkeypatch.setenv("JAXLM_DISTRIBUTED", "0")
    assert parallel.initialize() is False
    monkeypatch.setenv("JAXLM_DISTRIBUTED", "auto")
    assert parallel.initialize() and fake_distributed == [{}]  # JAX reads the TPU metadata itself
    monkeypatch.setattr(parallel, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1")  # GKE
    assert parallel.detected_cluster() == "tpu"


@pytest.mark.parametrize("nodelist, first", [("n1", "n1"), ("n1,n2", "n1"), ("gpu[003-004,7],c1", "gpu003"),
                                             ("gpu[12],c1", "gpu12"), ("a-b[1,2]", "a-b1")])
def test_first_slurm_host(nodelist, first):
    assert parallel._first_host(nodelist) == first
