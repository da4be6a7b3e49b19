"""What the command modules share: consoles, config flags, multi-host flags, checkpoint arguments."""

from __future__ import annotations

import argparse

from rich.markup import escape
from rich.table import Table

from jaxlm import config as run_config
from jaxlm.cli.console import console, out
from jaxlm.errors import UsageError

__all__ = ["console", "out"]


# ----------------------------------------------------------------------------- argument types
def positive_int(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if x < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {x}")
    return x


def non_negative_int(text: str) -> int:
    try:
        x = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if x < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {x}")
    return x


def non_negative_float(text: str) -> float:
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not x >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return x


def probability(text: str) -> float:
    """A number in (0, 1]."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return x


# ----------------------------------------------------------------------------- config flags
def add_config_args(p: argparse.ArgumentParser, required: bool = True):
    p.add_argument("--config", required=False, help="config file (configs/x.py[:arg]) or packaged config name"
                   + ("" if required else " (optional)"))
    p.add_argument("--help-config", action="store_true",
                   help="list every config field with its default, valid values and help (with --config: its values)")
    p.set_defaults(takes_overrides=True, config_required=required)


def add_distributed_args(p: argparse.ArgumentParser):
    g = p.add_argument_group("multi-host (jax.distributed; auto-detected on TPU pods and SLURM)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="coordinator address (process 0)")
    g.add_argument("--num-processes", type=positive_int, help="processes in the job")
    g.add_argument("--process-id", type=non_negative_int, help="this process's index")


def distributed_overrides(args) -> list[str]:
    """The multi-host flags as config overrides (they win over the config file)."""
    out = []
    if getattr(args, "coordinator", None):
        out.append(f"--config.parallel.coordinator_address={args.coordinator}")
    if getattr(args, "num_processes", None):
        out.append(f"--config.parallel.num_processes={args.num_processes}")
    if getattr(args, "process_id", None) is not None:
        out.append(f"--config.parallel.process_id={args.process_id}")
    return out


def load_run_config(args, overrides) -> run_config.RunConfig:
    """The validated RunConfig of --config, its overrides and the multi-host flags."""
    if not args.config:
        raise UsageError("--config is required (a config file like configs/quickstart.py or a packaged name)")
    return run_config.load(args.config, list(overrides) + distributed_overrides(args))


def help_config_requested(args, overrides) -> bool:
    """Handle --help-config: print every field (the config's values when --config is given)."""
    if not getattr(args, "help_config", False):
        return False
    values = run_config.to_dict(run_config.load(args.config, overrides)) if args.config else None
    table = Table("field", "default" if values is None else "value", "valid", "help",
                  title="config fields (override with --config.FIELD=VALUE)")
    for name, (default, help_text, valid) in run_config.help_table().items():
        value = default
        if values is not None:
            node = values
            for part in name.split("."):
                node = node[part]
            value = node
        table.add_row(escape(name), escape(repr(value)), escape(valid), escape(help_text))
    out.print(table)
    return True


def check_overrides(overrides, allowed_prefix: str = "--config."):
    bad = [o for o in overrides if o.startswith("-") and not o.startswith(allowed_prefix)]
    if bad:
        raise UsageError(f"unrecognized arguments: {' '.join(bad)}")
