"""jaxlm's user-facing errors: one base class, caught once by the CLI and printed as one line.

Raise a subclass for anything the *user* can fix (a bad flag, a missing file, an impossible config, a
corrupt checkpoint); its message says what is wrong and names the field, file or line, and its
optional `hint` says what to do. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class JaxlmError(Exception):
    """Base of every error a user can act on. `hint`: one line on what to do about it."""

    hint: str = ""

    def __init__(self, message: str = "", hint: str = ""):
        super().__init__(message)
        if hint:
            self.hint = hint


class UsageError(JaxlmError, ValueError):
    """A bad command line."""


class ConfigError(JaxlmError, ValueError):
    """An impossible configuration; the message names the field."""


class DataError(JaxlmError, ValueError):
    """Input data that cannot be used; the message says which file and line."""


class TokenizerError(JaxlmError, ValueError):
    """A tokenizer or chat template that cannot be loaded or applied."""


class CheckpointError(JaxlmError, RuntimeError):
    """A checkpoint that is missing, unreadable or of the wrong kind."""


class ConversionError(JaxlmError, ValueError):
    """A checkpoint that cannot be converted; the message names the tensor or field."""


class TrainingError(JaxlmError, RuntimeError):
    """Training cannot go on (a non-finite loss or update, an unusable run directory)."""


class ScalingError(JaxlmError, ValueError):
    """Input that a scaling-law fit cannot use; the message names the file, line and column."""


class Interrupted(JaxlmError):
    """A run stopped by SIGINT or SIGTERM after saving; `exit_code` is 130 or 143."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
