"""The `jaxlm` command: one module per command group, each a thin shell over library calls.

Only the module of the command being run is imported (`jaxlm --help` imports none), so each command
module imports what it needs at its top. Every user mistake is a `JaxlmError`, caught here once and
printed as one line (plus a hint); `--debug` (or JAXLM_DEBUG=1) shows the traceback instead.

    jaxlm train --config configs/quickstart.py --config.train.steps=100
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from rich.markup import escape

from jaxlm.cli.console import console
from jaxlm.errors import Interrupted, JaxlmError

# command -> (module in jaxlm.cli, one-line help). Keep this table and the modules' `register` in step.
COMMANDS = {
    "train": ("train", "train a model (language modelling; chat data trains on assistant turns)"),
    "eval": ("eval", "perplexity per group, lm-evaluation-harness benchmarks, XSTest and judged comparisons"),
    "generate": ("generate", "sample continuations from a checkpoint (long inputs with retrieval attention)"),
    "align": ("align", "preference training: DPO, LN-DPO, SimPO and the *PO family"),
    "analyze": ("align", "KL(policy || reference) and response lengths on a prompt set"),
    "convert": ("convert", "Hugging Face / GGUF <-> Orbax checkpoint conversion"),
    "pull": ("pull", "download a named pretrained model (smollm2-135m-instruct, ...) for --checkpoint NAME"),
    "chat": ("chat", "chat with a model in the terminal, streaming (/reset, /system TEXT, /exit)"),
    "tokenizer": ("convert", "train a byte-level BPE tokenizer on data"),
    "sweep": ("sweep", "a grid of runs: list it, run it here, or write its launch commands"),
    "fit": ("fit", "fit a scaling law to a results table"),
    "serve": ("serve", "an OpenAI-compatible server (chat, completions, streaming) with continuous batching"),
    "recipe": ("recipe", "run a data recipe (porover, wildfeedback, gpa, gentool) stage by stage, resumable"),
}


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: MESSAGE` and a hint to --help, exit status 2."""

    def error(self, message):
        console.print(f"[red]error:[/red] {escape(message)}")
        console.print(f"[dim]hint:[/dim] {escape(self.prog)} --help")
        sys.exit(2)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, that command's full sub-parser (the others are names only)."""
    parser = Parser(prog="jaxlm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name != command:
            sub.add_parser(name, help=help_text, add_help=False)
        else:
            importlib.import_module(f"jaxlm.cli.{module}").register(sub, name, help_text)
    return parser


def _command_of(argv) -> str | None:
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("JAXLM_DEBUG", "") not in ("", "0") or "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = _command_of(argv)
    parser = build_parser(command if command in COMMANDS else None)
    args, extra = parser.parse_known_args(argv)
    if extra and not getattr(args, "takes_overrides", False):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args, extra) or 0
    except Interrupted as e:
        if debug:
            raise
        console.print(f"[yellow]{escape(str(e))}[/yellow]")
        return e.exit_code
    except JaxlmError as e:
        if debug:
            raise
        console.print("[red]error:[/red] " + escape(str(e)))
        if e.hint:
            console.print("[dim]hint:[/dim] " + escape(e.hint))
        return 2
    except FileNotFoundError as e:
        if debug:
            raise
        console.print(f"[red]error:[/red] no such file: {escape(str(e.filename or e))}")
        return 2
    except KeyboardInterrupt:
        if debug:
            raise
        console.print("[yellow]interrupted[/yellow]")
        return 130


__all__ = ["COMMANDS", "build_parser", "main"]
