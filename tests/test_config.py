"""The run config: defaults with help, overrides, and start-up validation that names the field."""

import jax
import pytest

from jaxlm import config as run_config
from jaxlm import parallel
from jaxlm.model.config import ConfigError


def leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_field_has_a_help_line():
    table = run_config.help_table()
    names = list(leaves(run_config.to_dict(run_config.defaults())))
    assert set(names) == set(table)
    assert all(table[n][1].strip() for n in names)
    assert {"model", "data", "train", "parallel", "checkpoint", "log"} <= set(run_config.defaults())


@pytest.mark.parametrize("override,message", [
    ("--config.model.num_kv_heads=3", "model.num_heads 4 is not divisible by model.num_kv_heads 3"),
    ("--config.model.attention.impl=foo", "unknown model.attention.impl 'foo'"),
    ("--config.train.stepz=5", "unknown config field 'train.stepz' (did you mean 'train.steps'?)"),
    ("--config.train.steps=many", "cannot read 'many' as an integer"),
    ("--config.data.long_records=drop", "unknown data.long_records 'drop'; choose from split | truncate"),
    ("--config.train.grad_accum=3", "train.batch_size 16 is not divisible by train.grad_accum 3"),
    ("--config.parallel.tensor=3", "is not divisible by parallel.tensor 3"),
])
def test_validation_names_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        run_config.load("configs/quickstart.py", [override])
    assert message in str(e.value)


def test_batch_must_divide_over_data_and_fsdp():
    assert jax.device_count() == 8
    mesh = parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    with pytest.raises(ConfigError, match=r"batch size 6 not divisible by data\*fsdp=4"):
        parallel.check_batch(6, mesh)
    with pytest.raises(ConfigError, match="8 devices cannot be split"):
        parallel.make_mesh({"data": -1, "fsdp": 3, "tensor": 1})
    with pytest.raises(ConfigError, match="= 4 but there are 8 devices"):
        parallel.make_mesh({"data": 2, "fsdp": 2, "tensor": 1})


def test_overrides_both_syntaxes_and_types():
    cfg = run_config.load("quickstart", ["--config.train.steps", "7", "--config.train.lr=0.5", "--config.log.tensorboard=false",
                                "--config.model.rope_long_factor=(1.0, 2.0)", "--config.data.train=a.jsonl@2"])
    assert (cfg.train.steps, cfg.train.lr, cfg.log.tensorboard) == (7, 0.5, False)
    assert cfg.model.rope_long_factor == (1.0, 2.0) and cfg.data.train == "a.jsonl@2"


def test_saved_config_round_trips():
    cfg = run_config.load("configs/phi4_mini.py")
    again = run_config.from_dict(run_config.to_dict(cfg))
    assert run_config.to_dict(again) == run_config.to_dict(cfg)
    assert run_config.build(again).model == cfg.model
    assert cfg.model.num_params == 3_836_021_760
