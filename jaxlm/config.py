"""The run configuration as files and flags: the ml_collections ConfigDict view of `RunConfig`.

The schema is `jaxlm.train.config.RunConfig`, whose sections are frozen dataclasses declaring every
field's default, help and valid range. This module derives from it what users touch:

  * `defaults()`: a ConfigDict of every field, for config files (`get_config()` returns one);
  * `load(spec, overrides)`: a config file (`configs/x.py[:arg]` or a packaged name) plus
    `--config.a.b=value` overrides, built into a validated RunConfig;
  * `help_table()`: every field with its default, help and valid values (`--help-config`).
Errors name the field and suggest the nearest one.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxlm import schema
from jaxlm.errors import ConfigError
from jaxlm.train.config import RunConfig

__all__ = ["RunConfig", "apply_overrides", "as_configdict", "build", "defaults", "from_dict", "help_table", "load", "load_dict",
           "to_dict"]


def as_configdict(obj) -> ml_collections.ConfigDict:
    """A (nested) section dataclass as a mutable ConfigDict."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = as_configdict(v) if dataclasses.is_dataclass(v) else v
    return ml_collections.ConfigDict(out)


def defaults() -> ml_collections.ConfigDict:
    """Every field of RunConfig at its default, as a mutable ConfigDict."""
    return as_configdict(RunConfig())


def help_table() -> dict[str, tuple[Any, str, str]]:
    """{dotted field: (default, help, valid values)}."""
    return schema.help_texts(RunConfig)


def build(cfg) -> RunConfig:
    """A validated RunConfig from a ConfigDict, a nested dict or a RunConfig."""
    return RunConfig.from_dict(cfg)


def to_dict(cfg) -> dict:
    """JSON-able nested dict of a RunConfig or a ConfigDict (tuples become lists)."""
    if isinstance(cfg, RunConfig):
        return cfg.to_dict()
    return schema.to_dict(build(cfg))


def from_dict(d: dict) -> ml_collections.ConfigDict:
    """A ConfigDict of today's defaults updated with a (possibly partial, e.g. saved) nested dict."""
    return as_configdict(build(d))


# ----------------------------------------------------------------------------- loading
def load_module_config(spec: str) -> ml_collections.ConfigDict:
    """What `get_config([arg])` of `configs/x.py[:arg]` or a packaged config name returns (unvalidated:
    run configs are validated by `load_dict`, recipe configs by their recipe)."""
    path, _, arg = str(spec).partition(":")
    if path.endswith(".py"):
        file = Path(path)
        if not file.exists():
            raise ConfigError(f"config file {file} not found")
        mod_spec = importlib.util.spec_from_file_location(f"_jaxlm_config_{file.stem}", file)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(f"jaxlm.configs.{path}")
        except ModuleNotFoundError:
            raise ConfigError(f"no config file {path!r} and no packaged config jaxlm.configs.{path}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {spec} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def load_dict(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """The ConfigDict of `configs/x.py`, `configs/x.py:arg` or a packaged config name (`quickstart`),
    with overrides applied and the result validated."""
    cfg = load_module_config(spec)
    apply_overrides(cfg, overrides)
    build(cfg)
    return cfg


def load(spec: str, overrides: Sequence[str] = ()) -> RunConfig:
    """The validated RunConfig of a config file plus overrides."""
    return build(load_dict(spec, overrides))


def _field_names(cfg, prefix="") -> list[str]:
    out = []
    for k, v in cfg.items():
        out += _field_names(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [prefix + k]
    return out


def _parse_value(key: str, text: str, current):
    try:
        if isinstance(current, bool):
            low = text.lower()
            if low not in ("true", "false", "1", "0"):
                raise ValueError
            return low in ("true", "1")
        if isinstance(current, int):
            return int(text)
        if isinstance(current, float):
            return float(text)
        if isinstance(current, str):
            return text
        value = ast.literal_eval(text)
        if isinstance(current, tuple):
            value = tuple(value) if isinstance(value, list | tuple) else (value,)
        return value
    except (ValueError, SyntaxError):
        kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(current), type(current).__name__)
        raise ConfigError(f"--config.{key}: cannot read {text!r} as {kind}") from None


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Apply `--config.a.b=value` (or `--config.a.b value`) overrides in place."""
    names = _field_names(cfg)
    items = list(overrides)
    i = 0
    while i < len(items):
        arg = items[i]
        if not arg.startswith("--config."):
            raise ConfigError(f"unexpected argument {arg!r}; overrides look like --config.train.steps=100")
        key, eq, text = arg[len("--config."):].partition("=")
        if not eq:
            if i + 1 >= len(items):
                raise ConfigError(f"--config.{key} needs a value")
            text = items[i + 1]
            i += 1
        i += 1
        if key not in names:
            raise ConfigError(f"unknown config field {key!r}{schema.nearest(key, names)}")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = _parse_value(key, text, node[leaf])
