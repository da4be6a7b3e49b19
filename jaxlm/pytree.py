"""Helpers for parameter pytrees."""

from __future__ import annotations


def path_str(path) -> str:
    """'layers/attn/q' for a jax tree path (dict keys, attribute names and indices joined by '/')."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)
