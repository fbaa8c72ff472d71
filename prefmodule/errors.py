"""Mistakes in what a user gave (an option, a path, a data file), told apart from bugs.

Every check at the edge (module and datamodule arguments, model and data loading) raises a
:class:`UserError`. The CLI prints its message alone and exits with its ``exit_code`` (2; 3 when training
diverged); any other exception keeps its traceback. ``PREFMODULE_TRACEBACK=1`` (or ``--traceback``)
shows the traceback of a user error too.
"""

from __future__ import annotations

import errno
import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class UserError(Exception):
    """A configuration or data mistake: the message says what, where and how to fix it."""

    exit_code = 2
    on_every_rank = False  # raised by all ranks together (a reduced decision): the CLI prints it once, on rank 0


class ConfigError(UserError, ValueError):
    """An option's value is not allowed (names the option, the value and what is allowed)."""


class DataError(UserError, ValueError):
    """A data file or dataset cannot be used (names the file, line or row, and field)."""


class MissingFileError(UserError, FileNotFoundError):
    """A path given by the user does not exist."""


class WriteError(UserError, OSError):
    """A file could not be written (disk full, no permission, read-only file system): names the path."""

    def __str__(self) -> str:
        return self.strerror  # the message alone, not OSError's "[Errno N] message: 'path'"


class NonFiniteError(UserError, ArithmeticError):
    """Training diverged: non-finite losses or gradients, or weights that must not be exported."""

    exit_code = 3
    on_every_rank = True


def require(ok: bool, option: str, value: Any, allowed: str) -> None:
    """Raise a :class:`ConfigError` ``<option>=<value>: <allowed>.`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{option}={value!r}: {allowed}.")


def finite(value: Any) -> bool:
    """Whether ``value`` is a finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def show_traceback(argv: list[str] | None = None) -> bool:
    """Whether user errors keep their traceback: ``PREFMODULE_TRACEBACK=1`` or ``--traceback``."""
    flag = os.environ.get("PREFMODULE_TRACEBACK", "").lower() not in ("", "0", "false", "no")
    return flag or "--traceback" in (argv or [])


def find_user_error(error: BaseException) -> UserError | None:
    """The :class:`UserError` behind ``error``: itself, or one it was raised from (a parser or a
    launcher may wrap it)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, UserError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def add_note(error: BaseException, note: str) -> None:
    """Add ``note`` to ``error`` (as Python 3.11's ``add_note``, on 3.10 too): a traceback shows it below the
    error, and the CLI prints a user error's notes after its message, on the same line (:func:`message`)."""
    error.__notes__ = [*getattr(error, "__notes__", []), note]


def message(error: BaseException) -> str:
    """``error``'s message and its notes, on one line."""
    return " ".join([str(error), *getattr(error, "__notes__", [])])


WRITE_HINTS = {
    errno.ENOSPC: "free space on that disk, or write elsewhere (e.g. `--trainer.default_root_dir`)",
    errno.EDQUOT: "your disk quota is used up: free space, or write elsewhere (e.g. `--trainer.default_root_dir`)",
    errno.EFBIG: "the file exceeds the size limit for this process (`ulimit -f`) or file system",
    errno.EACCES: "you lack permission to write there: change the folder's permissions, or write elsewhere",
    errno.EPERM: "you lack permission to write there: change the folder's permissions, or write elsewhere",
    errno.EROFS: "that file system is read-only: write elsewhere (e.g. `--trainer.default_root_dir`)",
}


@contextmanager
def writing(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Turn a failure to write ``what`` at ``path`` (disk full, no permission, read-only) into a
    :class:`WriteError` naming both; anything else passes through."""
    try:
        yield
    except Exception as error:
        code = None if isinstance(error, UserError) else _write_errno(error)
        if code is None:
            raise
        raise WriteError(code, f"could not write {what} to {os.fspath(path)}: {os.strerror(code)}; "
                               f"{WRITE_HINTS[code]}.", os.fspath(path)) from error


def _write_errno(error: BaseException) -> int | None:
    """The operating system's error code behind ``error``: an ``OSError`` it holds or was raised from, or
    the code in its message (safetensors and torch.distributed.checkpoint report it there)."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in WRITE_HINTS:
            return error.errno
        match = re.search(r"os error (\d+)|\[Errno (\d+)\]", str(error))
        if match and int(match.group(1) or match.group(2)) in WRITE_HINTS:
            return int(match.group(1) or match.group(2))
        failures = getattr(error, "failures", None)  # torch.distributed.checkpoint's CheckpointException: per rank
        pending += [error.__cause__, error.__context__, *(failures.values() if isinstance(failures, dict) else ())]
    return None
