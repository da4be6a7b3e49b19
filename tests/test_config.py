"""The run config: defaults with help, overrides, and start-up validation that names the field."""

import jax
import pytest

from jaxlm import config as C
from jaxlm import parallel
from jaxlm.model.config import ConfigError


def leaves(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from leaves(v, f"{prefix}{k}.")
        else:
            yield prefix + k


def test_every_field_has_a_help_line():
    table = C.help_table()
    names = list(leaves(C.to_dict(C.defaults())))
    assert set(names) == set(table)
    assert all(table[n].strip() for n in names)
    assert {"model", "data", "train", "parallel", "checkpoint", "log"} <= set(C.defaults())


@pytest.mark.parametrize("override,message", [
    ("--config.model.num_kv_heads=3", "model.num_heads 4 is not divisible by model.num_kv_heads 3"),
    ("--config.model.attention.impl=foo", "unknown attention impl 'foo'"),
    ("--config.train.stepz=5", "unknown config field 'train.stepz' (did you mean 'train.steps'?)"),
    ("--config.train.steps=many", "cannot read 'many' as int"),
    ("--config.data.long_records=drop", "data.long_records must be split | truncate"),
    ("--config.train.grad_accum=3", "train.batch_size 16 is not divisible by train.grad_accum 3"),
    ("--config.parallel.tensor=3", "is not divisible by parallel.tensor 3"),
])
def test_validation_names_the_field(override, message):
    with pytest.raises(ConfigError) as e:
        C.load("configs/quickstart.py", [override])
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
    cfg = C.load("quickstart", ["--config.train.steps", "7", "--config.train.lr=0.5", "--config.log.tensorboard=false",
                                "--config.model.rope_long_factor=(1.0, 2.0)", "--config.data.train=a.jsonl@2"])
    assert (cfg.train.steps, cfg.train.lr, cfg.log.tensorboard) == (7, 0.5, False)
    assert cfg.model.rope_long_factor == (1.0, 2.0) and cfg.data.train == "a.jsonl@2"


def test_saved_config_round_trips():
    cfg = C.load("configs/phi4_mini.py")
    again = C.from_dict(C.to_dict(cfg))
    assert C.to_dict(again) == C.to_dict(cfg)
    assert C.model_config(again) == C.model_config(cfg)
    assert C.model_config(cfg).num_params == 3_836_021_760
