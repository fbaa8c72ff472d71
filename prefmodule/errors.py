"""Mistakes in what a user gave (an option, a path, a data file), told apart from bugs.

Every check at the edge (module and datamodule arguments, model and data loading) raises a
:class:`UserError`. The CLI prints its message alone and exits with code 2; any other exception
keeps its traceback. ``PREFMODULE_TRACEBACK=1`` (or ``--traceback``) shows the traceback of a
user error too.
"""

from __future__ import annotations

import os


class UserError(Exception):
    """A configuration or data mistake: the message says what, where and how to fix it."""


class ConfigError(UserError, ValueError):
    """An option's value is not allowed (names the option, the value and what is allowed)."""


class DataError(UserError, ValueError):
    """A data file or dataset cannot be used (names the file, line or row, and field)."""


class MissingFileError(UserError, FileNotFoundError):
    """A path given by the user does not exist."""


def show_traceback(argv: list[str] | None = None) -> bool:
    """Whether user errors keep their traceback: ``PREFMODULE_TRACEBACK=1`` or ``--traceback``."""
    flag = os.environ.get("PREFMODULE_TRACEBACK", "").lower() not in ("", "0", "false", "no")
    return flag or "--traceback" in (argv or [])
