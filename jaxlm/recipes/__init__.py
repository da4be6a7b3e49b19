"""Data recipes of the seed papers, as stages over one resumable, cached framework (`base`):

    porover        over-generation and preference optimisation against over-refusal (POROver)
    wildfeedback   feedback signals in real conversations -> preference pairs (WildFeedback)
    gpa            group-specific rubrics -> in-context and fine-tuned alignment (GPA)
    gentool        tool-use data for unseen tools, rank-then-call training (GenTool)

`jaxlm recipe NAME --preset mini` runs one; its config is `jaxlm.configs.recipes.NAME`.
"""

import importlib
import importlib.util

from jaxlm.errors import UsageError

# name -> module; a module defines RECIPE (a jaxlm.recipes.base.Recipe)
RECIPES = {"porover": "jaxlm.recipes.porover", "wildfeedback": "jaxlm.recipes.wildfeedback",
           "gpa": "jaxlm.recipes.gpa", "gentool": "jaxlm.recipes.gentool"}


def available() -> list[str]:
    """The recipes whose module exists in this installation."""
    return [name for name, module in RECIPES.items() if importlib.util.find_spec(module) is not None]


def get(name: str):
    if name not in RECIPES or importlib.util.find_spec(RECIPES[name]) is None:
        raise UsageError(f"unknown recipe {name!r}; choose from {', '.join(available()) or '(none installed)'}")
    return importlib.import_module(RECIPES[name]).RECIPE
