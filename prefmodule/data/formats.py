"""Reading preference rows from files, validating every row before training starts.

A row that cannot be used is reported with its file, line and field; nothing is dropped
silently. With ``on_bad_rows="error"`` (the default) loading stops on any bad row; with
``"skip"`` the good rows are kept and the bad ones reported.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
MAX_REPORTED = 20


@dataclass
class BadRow:
    source: str
    line: int  # 1-based line (JSONL) or row number
    field: str | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}"
        return f"{where}: field {self.field!r}: {self.reason}" if self.field else f"{where}: {self.reason}"


class DataValidationError(ValueError):
    """Raised when rows are malformed and ``on_bad_rows`` is ``"error"``."""

    def __init__(self, bad: list[BadRow], total: int):
        self.bad = bad
        listed = "\n  ".join(str(b) for b in bad[:MAX_REPORTED])
        more = f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else ""
        super().__init__(
            f"{len(bad)} of {total} rows are malformed:\n  {listed}{more}\n"
            "Fix them, or set `on_bad_rows: skip` to train on the good rows only."
        )


@dataclass
class LoadedRows:
    rows: list[dict]
    bad: list[BadRow] = field(default_factory=list)
    total: int = 0


def check_row(row: object, source: str, line: int) -> BadRow | None:
    """The first problem of a standard-format row, or None when it is usable."""
    if not isinstance(row, dict):
        return BadRow(source, line, None, f"expected a JSON object, got {type(row).__name__}")
    for name in FIELDS:
        if name not in row:
            return BadRow(source, line, name, "missing")
        if not isinstance(row[name], str):
            return BadRow(source, line, name, f"expected a string, got {type(row[name]).__name__}")
    for name in ("chosen", "rejected"):
        if not row[name].strip():
            return BadRow(source, line, name, "empty response")
    if row["chosen"] == row["rejected"]:
        return BadRow(source, line, "rejected", "identical to chosen")
    return None


def read_jsonl(path: str | Path, on_bad_rows: str = "error") -> LoadedRows:
    """Read and validate every line of a JSONL file of ``{"prompt", "chosen", "rejected"}`` rows."""
    if on_bad_rows not in ("error", "skip"):
        raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    loaded = LoadedRows(rows=[])
    with path.open(encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            loaded.total += 1
            try:
                row = json.loads(text)
            except json.JSONDecodeError as error:
                loaded.bad.append(BadRow(str(path), number, None, f"invalid JSON ({error.msg})"))
                continue
            problem = check_row(row, str(path), number)
            if problem:
                loaded.bad.append(problem)
            else:
                loaded.rows.append({name: row[name] for name in FIELDS})
    if loaded.bad:
        if on_bad_rows == "error":
            raise DataValidationError(loaded.bad, loaded.total)
        log.warning("skipping %d bad rows of %s:\n  %s", len(loaded.bad), path,
                    "\n  ".join(str(b) for b in loaded.bad[:MAX_REPORTED]))
    if not loaded.rows:
        raise ValueError(f"{path}: no usable rows ({loaded.total} read)")
    return loaded
