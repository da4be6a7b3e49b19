"""Errors of jaxlm.scaling, importable without numpy or scipy (the CLI loads it on every call)."""


class ScalingError(ValueError):
    """Input that a scaling-law fit cannot use; the message names the file, line and column."""
