import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests compile many tiny programs: LLVM -O0 halves XLA:CPU compile time, and runtime does not matter
# at these sizes. Subprocesses started by tests inherit it.
# Eight fake CPU devices let the sharding tests build real meshes in this process.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("JAXLM_SHARED", REPO.parent / "shared"))
DATA = SHARED / "data"


@pytest.fixture
def shared_data():
    """../shared/data, or skip when this checkout has none beside it."""
    if not DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return DATA


def tiny_config(tmp_path=None, **train):
    """The quickstart config shrunk for tests (2 layers, short rows, a few steps)."""
    from jaxlm import config as run_config

    cfg = run_config.load_dict("configs/quickstart.py")
    cfg.model.update(num_layers=2, hidden_size=64, intermediate_size=128)
    cfg.data.update(seq_len=64, prefetch=0)
    cfg.train.update(**{**dict(steps=4, batch_size=8, warmup_steps=2, eval_every=0, eval_batches=2), **train})
    cfg.checkpoint.update(every=0, async_save=False)
    cfg.log.update(every=1, tensorboard=False, progress=False, sample_prompt="")
    if tmp_path is not None:
        cfg.log.dir = str(tmp_path / "run")
    return cfg


def write_config(cfg, path):
    """A config file that rebuilds `cfg` exactly (for `jaxlm` subprocesses)."""
    import json

    from jaxlm import config as run_config

    text = json.dumps(json.dumps(run_config.to_dict(cfg)))
    path.write_text(f"import json\nfrom jaxlm import config as run_config\n\n\ndef get_config():\n"
                    f"    return run_config.from_dict(json.loads({text}))\n")
    return path


def read_losses(path):
    """{step: loss} from a metrics file; a resumed run's later records win."""
    import json

    out = {}
    for line in open(path):
        r = json.loads(line)
        if "lr" in r:
            out[r["step"]] = r["loss"]
    return out


def run_until_step(proc, metrics, step, deadline=240):
    """Wait until a training subprocess has logged `step` in `metrics` (it must still be running)."""
    import time

    end = time.time() + deadline
    while time.time() < end and proc.poll() is None:
        if metrics.exists() and max(read_losses(metrics), default=0) >= step:
            return
        time.sleep(0.05)
    tail = proc.stderr.read()[-2000:] if proc.stderr else ""
    raise AssertionError(f"the run did not reach step {step}: {tail}")
