"""`jaxlm recipe NAME`: run a data recipe (POROver, WildFeedback, GPA, GenTool) stage by stage."""

from __future__ import annotations

import contextlib
import importlib
import signal
import threading
from pathlib import Path

from rich.markup import escape
from rich.table import Table

from jaxlm import config as run_config
from jaxlm import recipes
from jaxlm.cli.common import check_overrides, console, out
from jaxlm.errors import ConfigError


def register(sub, name, help_text):
    p = sub.add_parser(name, help=help_text,
                       epilog="Overrides follow: --config.recipe.judge.base_url=http://HOST:8000/v1 "
                              "--config.recipe.teacher.model=NAME (see --list for the stages)")
    p.add_argument("recipe", help=f"one of: {', '.join(recipes.RECIPES)}")
    p.add_argument("--config", help="recipe config file (default: the packaged jaxlm.configs.recipes.RECIPE)")
    p.add_argument("--preset", help="named settings of the recipe (e.g. mini: sizes for a CPU run)")
    p.add_argument("--dir", help="run directory (default: the config's recipe.dir)")
    p.add_argument("--from-stage", metavar="STAGE", help="redo this stage and every later one")
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--list", action="store_true", help="list the stages and what each writes, then exit")
    p.set_defaults(func=cmd_recipe, takes_overrides=True)


def flatten(node, prefix: str = "") -> dict:
    """{dotted field: value} of a preset written nested ({"recipe": {"sft": {"steps": 10}}}, as a
    ConfigDict must be) or flat ({"recipe.sft.steps": 10})."""
    if hasattr(node, "to_dict"):
        node = node.to_dict()
    out = {}
    for k, v in node.items():
        if isinstance(v, dict) or hasattr(v, "to_dict"):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def load_recipe_config(name: str, path: str | None, preset: str | None, overrides):
    """The recipe's ConfigDict: its config file, then the preset, then --config.* overrides."""
    if path:
        cfg = run_config.load_module_config(path)
    else:
        cfg = importlib.import_module(f"jaxlm.configs.recipes.{name}").get_config()
    if preset:
        presets = cfg.get("presets", {})
        if preset not in presets:
            raise ConfigError(f"recipe {name} has no preset {preset!r}; choose from {', '.join(presets) or '(none)'}")
        run_config.apply_overrides(cfg, [f"--config.{k}={v}" for k, v in flatten(presets[preset]).items()])
    run_config.apply_overrides(cfg, list(overrides))
    return cfg


@contextlib.contextmanager
def terminate_as_interrupt():
    """Inside: a SIGTERM (`timeout`, a job scheduler) unwinds the run like Ctrl-C, so the local `jaxlm
    serve` processes it started are stopped instead of left running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def cmd_recipe(args, overrides):
    check_overrides(overrides)
    recipe = recipes.get(args.recipe)
    if args.list:
        table = Table("stage", "writes", "what it does", title=f"recipe {recipe.name}")
        for s in recipe.stages:
            table.add_row(s.name, escape(", ".join(s.outputs)), escape(s.help))
        out.print(table)
        return 0
    cfg = load_recipe_config(args.recipe, args.config, args.preset, overrides)
    run_dir = Path(args.dir or cfg.recipe.dir)
    console.print(f"recipe {recipe.name} in {escape(str(run_dir))}" + (f" (preset {args.preset})" if args.preset else ""))
    with terminate_as_interrupt():
        summaries = recipe.run(cfg.recipe, run_dir, from_stage=args.from_stage, until=args.until, console=console)
    report = run_dir / "report.md"
    if report.exists():
        console.print(f"[green]report[/green] {escape(str(report))}")
    return 0 if summaries else 1
