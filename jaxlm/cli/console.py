"""The consoles every command prints with (kept free of heavy imports: `jaxlm --help` loads only this).

Messages and progress go to stderr, results to stdout. soft_wrap: a line is never wrapped at 80
columns when the output is a pipe or a file (a terminal wraps by itself); tables written to a pipe
or a file get 160 columns instead of rich's 80."""

import sys

from rich.console import Console


def _width(stream):
    try:
        return None if stream.isatty() else 160
    except (AttributeError, ValueError):
        return 160


console = Console(stderr=True, soft_wrap=True, width=_width(sys.stderr))
out = Console(soft_wrap=True, width=_width(sys.stdout))
