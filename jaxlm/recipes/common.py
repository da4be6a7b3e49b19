"""Small helpers the recipes share: validating conversation records and reading JSON out of a
model's reply."""

from __future__ import annotations

import json
import re


def conversation_problem(rec) -> str | None:
    """Why a conversation record cannot be used, or None: messages must be role/content objects,
    user and assistant alternating from a user turn (one leading system turn allowed), content a
    string, a user turn non-empty (an assistant turn may be empty: recipes skip and count it later)."""
    msgs = rec.get("messages")
    if not isinstance(msgs, list) or not msgs:
        return "missing messages"
    if isinstance(msgs[0], dict) and msgs[0].get("role") == "system":
        msgs = msgs[1:]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            return "missing content"
        if m.get("role") != ("user", "assistant")[i % 2]:
            return "non-alternating roles"
        if m["role"] == "user" and not m["content"].strip():
            return "missing content"
    return None if msgs else "missing messages"


def first_json(text: str):
    """The first JSON object or list that parses in `text` (models wrap JSON in prose or fences), or None."""
    text = str(text or "")
    dec = json.JSONDecoder()
    for m in re.finditer(r"[\[{]", text):
        try:
            return dec.raw_decode(text[m.start():])[0]
        except ValueError:
            continue
    return None
