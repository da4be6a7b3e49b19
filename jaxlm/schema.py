"""The config schema's machinery: sections are frozen dataclasses whose fields carry their default,
a one-line help and their valid range, so validation, `--help-config` and the ConfigDict view are
all derived from one declaration.

    @dataclasses.dataclass(frozen=True)
    class TrainConfig:
        SECTION: ClassVar[str] = "train"
        lr: float = field(3e-4, "peak learning rate", ge=0)

        def __post_init__(self):
            check(self)                       # types, ranges and choices, naming `train.lr`

Floats must be finite unless a field says `finite=False`. Errors are `ConfigError`s that name the
field ("train.lr must be >= 0, got -0.001").
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from typing import Any

from jaxlm.errors import ConfigError

__all__ = ["check", "field", "field_names", "from_dict", "help_texts", "nearest", "ranges", "to_dict"]


def field(default: Any, help: str, *, ge=None, gt=None, le=None, lt=None, choices=None,  # noqa: A002
          finite: bool = True):
    """A config field: default, one-line help, and its valid values (bounds and/or choices)."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults: configs must be hashable")
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices, "finite": finite}
    return dataclasses.field(default=default, metadata=meta)


def _where(obj_or_cls, where: str | None) -> str:
    return where if where is not None else getattr(obj_or_cls, "SECTION", type(obj_or_cls).__name__)


def _dotted(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _is_section(cls) -> bool:
    return isinstance(cls, type) and dataclasses.is_dataclass(cls)


def _subsection(f: dataclasses.Field):
    return type(f.default) if dataclasses.is_dataclass(f.default) and not isinstance(f.default, type) else None


def ranges(f: dataclasses.Field) -> str:
    """The valid values of a field in words ('>= 0', 'in (0, 1]', 'one of a | b'), or ''."""
    m = f.metadata
    if m.get("choices"):
        return "one of " + " | ".join(str(c) for c in m["choices"])
    lo = ("[", m["ge"]) if m.get("ge") is not None else ("(", m["gt"]) if m.get("gt") is not None else None
    hi = ("]", m["le"]) if m.get("le") is not None else (")", m["lt"]) if m.get("lt") is not None else None
    if lo and hi:
        return f"in {lo[0]}{lo[1]}, {hi[1]}{hi[0]}"
    if lo:
        return (">= " if lo[0] == "[" else "> ") + str(lo[1])
    if hi:
        return ("<= " if hi[0] == "]" else "< ") + str(hi[1])
    return ""


def _check_value(name: str, f: dataclasses.Field, value):
    m = f.metadata
    default = f.default
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {value!r}")
        return
    if isinstance(default, int | float) and not isinstance(default, bool):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} must be a number, got {value!r}")
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, float) and m.get("finite", True) and not math.isfinite(value):
            raise ConfigError(f"{name} must be a finite number, got {value}")
        bad = ((m.get("ge") is not None and not value >= m["ge"]) or (m.get("gt") is not None and not value > m["gt"])
               or (m.get("le") is not None and not value <= m["le"]) or (m.get("lt") is not None and not value < m["lt"]))
        if bad:
            raise ConfigError(f"{name} must be {ranges(f)}, got {value}")
    if isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    if m.get("choices") and value not in m["choices"]:
        near = difflib.get_close_matches(str(value), [str(c) for c in m["choices"]], n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(f"unknown {name} {value!r}{hint}; choose from {' | '.join(map(str, m['choices']))}")


def check(obj, where: str | None = None) -> None:
    """Check every declared type, range and choice of a section (not its sub-sections: they check
    themselves when built)."""
    where = _where(obj, where)
    for f in dataclasses.fields(obj):
        if _subsection(f) is None:
            _check_value(_dotted(where, f.name), f, getattr(obj, f.name))


def to_dict(obj) -> dict:
    """JSON-able nested dict (tuples become lists)."""
    def conv(v):
        if dataclasses.is_dataclass(v):
            return {f.name: conv(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        return v
    return conv(obj)


def _deep_tuple(v):
    return tuple(_deep_tuple(x) for x in v) if isinstance(v, list | tuple) else v


def from_dict(cls, d: Mapping, where: str | None = None):
    """Build section `cls` from a (possibly partial) nested mapping; unknown keys are errors that
    suggest the nearest field; missing keys keep their defaults."""
    where = _where(cls, where)
    if hasattr(d, "to_dict") and not isinstance(d, dict):  # an ml_collections ConfigDict
        d = d.to_dict()
    if dataclasses.is_dataclass(d):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where} must be a section (a mapping of fields), got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {}
    for k, v in d.items():
        if k not in fields:
            near = difflib.get_close_matches(k, list(fields), n=1)
            hint = f" (did you mean '{_dotted(where, near[0])}'?)" if near else ""
            raise ConfigError(f"unknown config field '{_dotted(where, k)}'{hint}")
        sub = _subsection(fields[k])
        if sub is not None:
            v = from_dict(sub, v, _dotted(where, k))
        elif isinstance(fields[k].default, tuple):
            v = _deep_tuple(v) if isinstance(v, list | tuple) else (v,)
        elif isinstance(fields[k].default, float) and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        kw[k] = v
    return cls(**kw)


def help_texts(cls, prefix: str = "") -> dict[str, tuple[Any, str, str]]:
    """{dotted field: (default, help, valid values)} over a section and its sub-sections."""
    out = {}
    for f in dataclasses.fields(cls):
        sub = _subsection(f)
        if sub is not None:
            out.update(help_texts(sub, f"{prefix}{f.name}."))
        else:
            out[prefix + f.name] = (f.default, f.metadata.get("help", ""), ranges(f))
    return out


def field_names(cls, prefix: str = "") -> list[str]:
    return list(help_texts(cls, prefix))


def nearest(name: str, names) -> str:
    """' (did you mean X?)' for the closest of `names`, or ''."""
    near = difflib.get_close_matches(name, list(names), n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""
