"""GPA's rubric file and the system prompt built from it (GPA-CT: the group's rubric in context).

rubrics.json (format "gpa-rubrics/1"):

    {"format": "gpa-rubrics/1", "groups": ["developer", "general"], "intents": [...],
     "rubrics": {GROUP: {INTENT: {
         "criteria": ["Give runnable code ...", ...],          # what the model is told, one per item
         "items": [{"item": "i3", "label": "wants runnable code", "z": 3.1, "delta": 1.2,
                    "count_group": 14, "n_group": 60, "count_rest": 2, "n_rest": 75, "members": [...]}, ...],
         "written_by": "judge" | "labels",                    # criteria[k] paraphrases items[k]
         "conversations": 37}}},
     "provenance": {"contrast": "contrast.jsonl", "items": "items.jsonl", "prior_strength": ..., ...}}

criteria[k] is written from items[k], so each line of a rubric traces back to the item counts behind it.
This module is imported by `jaxlm chat` and `jaxlm serve`: it is light (json only).
"""

from __future__ import annotations

import json
from pathlib import Path

from jaxlm.errors import DataError, UsageError

FORMAT = "gpa-rubrics/1"
CT_SYSTEM = ("You are a helpful assistant. The user is a {group} user. Users like them prefer replies that follow "
             "this rubric:\n{criteria}")


def load_rubrics(path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--rubric {path}: no such file") from None
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: not a JSON rubric file ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("rubrics"), dict):
        raise DataError(f"{path}: not a GPA rubric file (expected \"format\": \"{FORMAT}\" and \"rubrics\")")
    return doc


def criteria_for(doc: dict, group: str, intent: str | None = None) -> list[str]:
    """The rubric lines of `group` for `intent`, or of every intent (deduplicated, in order) when None."""
    rubrics = doc["rubrics"]
    if group not in rubrics:
        raise UsageError(f"--group {group!r}: the rubric file has the groups {', '.join(sorted(rubrics)) or '(none)'}")
    by_intent = rubrics[group]
    if intent is not None and intent not in by_intent:
        raise UsageError(f"--intent {intent!r}: group {group} has rubrics for {', '.join(sorted(by_intent)) or '(none)'}")
    lines: list[str] = []
    for name in ([intent] if intent is not None else sorted(by_intent)):
        for c in by_intent[name].get("criteria", []):
            if c not in lines:
                lines.append(c)
    return lines


def rubric_system(doc: dict, group: str, intent: str | None = None, base: str | None = None) -> str:
    """The GPA-CT system prompt for `group` (and `intent`); `base` (a system message of its own) first."""
    lines = criteria_for(doc, group, intent)
    text = CT_SYSTEM.format(group=group, criteria="\n".join(f"- {c}" for c in lines) or "- (no distinguishing items)")
    return f"{base}\n\n{text}" if base else text


def system_from_args(rubric: str | None, group: str | None, intent: str | None = None,
                     base: str | None = None) -> str | None:
    """The system message `jaxlm chat` / `jaxlm serve` use given --rubric/--group/--intent/--system."""
    if rubric is None and group is None:
        return base
    if not rubric or not group:
        raise UsageError("--rubric FILE and --group G go together")
    return rubric_system(load_rubrics(rubric), group, intent, base)
