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
def _number(parse, ok, bound: str, what: str):
    """An argparse type: `parse` the text (else "'x' is not {what}"), then check `ok` (else "must be {bound}")."""
    def convert(text: str):
        try:
            x = parse(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if not ok(x):
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return x
    return convert


positive_int = _number(int, lambda x: x >= 1, ">= 1", "an integer")
non_negative_int = _number(int, lambda x: x >= 0, ">= 0", "an integer")
non_negative_float = _number(float, lambda x: x >= 0, ">= 0", "a number")  # nan fails x >= 0
probability = _number(float, lambda x: 0 < x <= 1, "in (0, 1]", "a number")  # a number in (0, 1]


def add_sampling_args(p: argparse.ArgumentParser, max_new_tokens: int):
    """--max-new-tokens, --temperature, --top-k, --top-p, --seed: the sampling flags of generate and chat."""
    p.add_argument("--max-new-tokens", type=positive_int, default=max_new_tokens)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=non_negative_int, default=0)
    p.add_argument("--top-p", type=probability, default=1.0)
    p.add_argument("--seed", type=non_negative_int, default=0)


def add_run_args(p: argparse.ArgumentParser, init_help: str):
    """--resume and --init: where a training run starts (train and align)."""
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the run directory")
    p.add_argument("--init", metavar="CKPT", help=init_help)


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
