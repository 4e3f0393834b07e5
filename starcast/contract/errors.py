"""The error types every layer shares, and what the command line makes of them.

UserError ("you gave us something wrong") is printed as one line, exit code 2. Through the Python API the
argument errors are also ValueError / TypeError, as Python callers expect. ParityError ("a proof failed") is a
defect of the export, not of the input: exit code 1.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (a path, a checkpoint, an option, a folder's contents), not a bug."""


class InvalidValue(UserError, ValueError):
    """An argument of the right type with a value that cannot be used (a negative count, a NaN temperature)."""


class InvalidType(UserError, TypeError):
    """An argument of the wrong type (a ragged list of ids, a float where an int is needed)."""


class MissingExtra(UserError):
    """A command needs an optional part of starcast that is not installed."""

    def __init__(self, what: str, extra: str, module: str):
        super().__init__(
            f"{what} needs starcast's '{extra}' extra ({module} is not installed): in a starcast clone, "
            f"pip install '.[{extra}]'"
        )


class ParityError(Exception):
    """A graph does not compute what its reference computes: reported with its numbers, exit code 1."""
