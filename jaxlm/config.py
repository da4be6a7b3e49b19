"""The run configuration: one ml_collections ConfigDict with a section per concern.

Every field has a default and a one-line help text (`jaxlm <cmd> --help-config` prints them).
Config files are Python files with `get_config()` (ml_collections convention, optional `:arg`);
overrides use the ml_collections syntax `--config.train.steps=100`. `validate` fails at start-up
with a message that names the field.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

from jaxlm.model.config import ConfigError, ModelConfig
from jaxlm.model.config import help_texts as model_help

# section -> field -> (default, help). The model section comes from ModelConfig.
SECTIONS: dict[str, dict[str, tuple[Any, str]]] = {
    "data": {
        "tokenizer": ("", "tokenizer: a tokenizer.json, a .tiktoken file, or PRESET:path (phi4, o200k_base, gpt2)"),
    },
}


def _dataclass_section(obj) -> ml_collections.ConfigDict:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out[f.name] = _dataclass_section(v) if dataclasses.is_dataclass(v) else v
    return ml_collections.ConfigDict(out)


def defaults() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.model = _dataclass_section(ModelConfig())
    for name, fields in SECTIONS.items():
        cfg[name] = ml_collections.ConfigDict({k: v for k, (v, _) in fields.items()})
    return cfg


def help_table() -> dict[str, str]:
    table = {f"model.{k}": v for k, v in model_help().items()}
    for name, fields in SECTIONS.items():
        table.update({f"{name}.{k}": h for k, (_, h) in fields.items()})
    return table


# ----------------------------------------------------------------------------- loading
def load(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """`configs/x.py`, `configs/x.py:arg`, or a packaged config name (`quickstart`), then overrides."""
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
        except ModuleNotFoundError as e:
            raise ConfigError(f"no config file {path!r} and no packaged config jaxlm.configs.{path}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config {spec} defines no get_config()")
    cfg = module.get_config(arg) if arg else module.get_config()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


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
        raise ConfigError(f"--config.{key}: cannot read {text!r} as {type(current).__name__}") from None


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
            near = difflib.get_close_matches(key, names, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigError(f"unknown config field {key!r}{hint}")
        *parents, leaf = key.split(".")
        node = cfg
        for p in parents:
            node = node[p]
        node[leaf] = _parse_value(key, text, node[leaf])


# ----------------------------------------------------------------------------- views
def to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """JSON-able dict (tuples become lists)."""
    def conv(v):
        if isinstance(v, ml_collections.ConfigDict):
            return {k: conv(x) for k, x in v.items()}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        return v
    return conv(cfg)


def from_dict(d: dict) -> ml_collections.ConfigDict:
    """Rebuild a config (for example one saved in a checkpoint) on top of today's defaults."""
    cfg = defaults()

    def merge(node, src, prefix):
        for k, v in src.items():
            if k not in node:
                raise ConfigError(f"unknown config field {prefix}{k!r} in saved config")
            if isinstance(node[k], ml_collections.ConfigDict):
                merge(node[k], v, f"{prefix}{k}.")
            else:
                node[k] = tuple(v) if isinstance(node[k], tuple) else v
    merge(cfg, d, "")
    return cfg


def model_config(cfg) -> ModelConfig:
    section = cfg["model"] if "model" in cfg else cfg
    return ModelConfig.from_dict(to_dict(section) if isinstance(section, ml_collections.ConfigDict) else section)


def validate(cfg: ml_collections.ConfigDict) -> None:
    model_config(cfg)  # ModelConfig validates itself, naming model.* fields
