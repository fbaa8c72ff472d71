"""Preference rows in the formats people already have (SPEC.md §7), validated before training starts.

- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings.
- ``conversational``: the same three as lists of ``{"role", "content"}`` messages (system messages included).
- ``implicit``: only ``chosen`` and ``rejected``, each the whole text or dialogue; the prompt is their longest
  common prefix (TRL's ``extract_prompt``), and Anthropic HH-style ``\\n\\nHuman: ... \\n\\nAssistant:`` texts are
  split at the last assistant turn.

``auto`` detects the format from the dataset's first row, as TRL does (no ``prompt``, or a text prompt with
message responses, means implicit); every row is then checked against it. A row that cannot be used is
reported with its file, line or row, and field; nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from prefmodule.data.sources import BrokenJSON, Source
from prefmodule.errors import DataError

Format = Literal["auto", "standard", "conversational", "implicit"]
FORMATS = Format.__args__
FIELDS = ("prompt", "chosen", "rejected")
MAX_REPORTED = 20
HH_ASSISTANT = "\n\nAssistant:"


@dataclass
class BadRow:
    source: str
    line: int  # 1-based line (JSONL, CSV) or 0-based row (JSON list, Parquet, Hub)
    field: str | None
    reason: str
    kind: str  # the reason's category, counted in the summary
    unit: str  # "line" or "row"

    def __str__(self) -> str:
        where = f"{self.source}:{self.line}" if self.unit == "line" else f"{self.source}[row {self.line}]"
        return f"{where}: field {self.field!r}: {self.reason}" if self.field else f"{where}: {self.reason}"


class DataValidationError(DataError):
    """Raised when rows are malformed and ``on_bad_rows`` is ``"error"``."""

    def __init__(self, bad: list[BadRow], total: int):
        self.bad = bad
        super().__init__(
            f"{len(bad)} of {total} rows are malformed:\n  {describe(bad)}\n"
            "Fix them, or set `on_bad_rows: skip` to train on the good rows only."
        )


def describe(bad: list[BadRow]) -> str:
    """The first ``MAX_REPORTED`` bad rows, one a line, and how many more there are."""
    listed = "\n  ".join(str(b) for b in bad[:MAX_REPORTED])
    return listed + (f"\n  ... and {len(bad) - MAX_REPORTED} more" if len(bad) > MAX_REPORTED else "")


@dataclass
class Rows:
    """The usable rows of a split: ``index`` is the row's position among all rows of its sources."""

    index: list[int] = field(default_factory=list)
    prompt: list = field(default_factory=list)  # str, or list of messages
    chosen: list = field(default_factory=list)
    rejected: list = field(default_factory=list)
    bad: list[BadRow] = field(default_factory=list)
    total: int = 0
    format: str = "standard"
    conversational: bool = False


class RowChecker:
    """Validates and normalises rows to ``(prompt, chosen, rejected)`` in the format of the dataset ``rows``.

    ``columns`` maps a dataset's column names to ``prompt``/``chosen``/``rejected`` (e.g. ``{"question": "prompt"}``);
    errors name the dataset's own column.
    """

    def __init__(self, rows: list, format: Format = "auto", columns: dict[str, str] | None = None):
        check_settings(format, columns)
        self.columns = {target: name for name, target in (columns or {}).items()}  # prompt -> question
        self.format, self.conversational = detect_format(rows, format, self.column("prompt"), self.column("chosen"))

    def column(self, name: str) -> str:
        return self.columns.get(name, name)

    def check(self, row: object) -> tuple:
        """``(prompt, chosen, rejected)`` of a usable row; raises :class:`RowError` otherwise."""
        if isinstance(row, BrokenJSON):
            raise RowError(None, row.message, "invalid JSON")
        if not isinstance(row, dict):
            raise RowError(None, f"expected an object with fields {self._needed()}, got {_type(row)}", "wrong type")
        values = {}
        for name in ("chosen", "rejected") if self.format == "implicit" else FIELDS:
            column = self.column(name)
            if column not in row:
                raise RowError(column, "missing", "missing field")
            problem = self._type_problem(row[column])
            if problem:
                raise RowError(column, problem, "wrong type")
            values[name] = row[column]
        if values["chosen"] == values["rejected"]:
            raise RowError(self.column("rejected"), "identical to chosen", "identical responses")
        if self.format == "implicit":
            values["prompt"], values["chosen"], values["rejected"] = extract_prompt(
                values["chosen"], values["rejected"], self.column("chosen"))
        for name in ("chosen", "rejected"):
            if is_empty(values[name]):
                raise RowError(self.column(name), "empty response", "empty response")
        if self.conversational and not values["prompt"]:
            raise RowError(self.column("prompt"), "no prompt messages", "empty prompt")
        return values["prompt"], values["chosen"], values["rejected"]

    def _needed(self) -> list[str]:
        return [self.column(n) for n in (("chosen", "rejected") if self.format == "implicit" else FIELDS)]

    def _type_problem(self, value: object) -> str | None:
        if not self.conversational:
            return None if isinstance(value, str) else f"expected a string ({self.format} format), got {_type(value)}"
        if not isinstance(value, list):
            return f"expected a list of {{role, content}} messages ({self.format} format), got {_type(value)}"
        for number, message in enumerate(value):
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                return f"message {number}: expected an object with 'role' and 'content', got {message!r:.60}"
            for key in ("role", "content"):
                if not isinstance(message[key], str):
                    return f"message {number}: {key!r} should be a string, got {_type(message[key])}"
        return None


class RowError(ValueError):
    """Why a row cannot be used: the field (as the dataset names it), the reason and its category."""

    def __init__(self, field: str | None, reason: str, kind: str):
        super().__init__(reason)
        self.field, self.reason, self.kind = field, reason, kind


def check_settings(format: str, columns: dict[str, str] | None) -> None:
    if format not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {format!r}")
    targets = list((columns or {}).values())
    if set(targets) - set(FIELDS) or len(set(targets)) < len(targets):
        raise ValueError(f"columns must map dataset columns to distinct {list(FIELDS)}, e.g. "
                         f"{{question: prompt}}; got {columns}")


def detect_format(rows: list, format: Format, prompt: str, chosen: str) -> tuple[str, bool]:
    """``(format, conversational)`` of a dataset: given, or as TRL reads it (a dataset has a prompt when any row
    has one; a text prompt beside message responses is implicit); the kind of value from the first row having it."""
    objects = [row for row in rows if isinstance(row, dict)]
    first_chosen = next((row[chosen] for row in objects if row.get(chosen) is not None), None)
    if format == "auto":
        first_prompt = next((row[prompt] for row in objects if row.get(prompt) is not None), None)
        implicit = first_prompt is None or is_messages(first_prompt) != is_messages(first_chosen)
        format = "implicit" if implicit else "conversational" if is_messages(first_chosen) else "standard"
    conversational = format == "conversational" or (format == "implicit" and is_messages(first_chosen))
    return format, conversational


def read_rows(sources: list[Source], format: Format = "auto", columns: dict[str, str] | None = None) -> Rows:
    """Read and validate every row of ``sources``, in order; bad rows are collected, never dropped silently."""
    located = [(source, number, row) for source in sources for number, row in source.rows()]
    checker = RowChecker([row for _, _, row in located], format, columns)
    rows = Rows(total=len(located), format=checker.format, conversational=checker.conversational)
    for index, (source, number, row) in enumerate(located):
        try:
            prompt, chosen, rejected = checker.check(row)
        except RowError as error:
            rows.bad.append(BadRow(source.label, number, error.field, error.reason, error.kind, source.unit))
            continue
        rows.index.append(index)
        rows.prompt.append(prompt)
        rows.chosen.append(chosen)
        rows.rejected.append(rejected)
    return rows

def extract_prompt(chosen: str | list, rejected: str | list, column: str = "chosen") -> tuple:
    """Split the shared prompt off two whole texts or dialogues: ``(prompt, chosen, rejected)``.

    Messages: the longest common run of messages. Text: HH dialogues split after the last
    ``\\n\\nAssistant:``; other text at the longest common prefix, a trailing space moved to the responses
    (as TRL's ``extract_prompt``).
    """
    if isinstance(chosen, str) and HH_ASSISTANT in chosen and HH_ASSISTANT in rejected:
        cuts = [text.rfind(HH_ASSISTANT) + len(HH_ASSISTANT) for text in (chosen, rejected)]
        shared = [n for n in sorted(cuts, reverse=True) if chosen[:n] == rejected[:n]]
        if not shared:
            raise RowError(column, "chosen and rejected differ before their last '\\n\\nAssistant:' turn",
                           "no shared prompt")
        n = shared[0]
    else:
        n = common_prefix_length(chosen, rejected)
        if isinstance(chosen, list) and n == 0:
            raise RowError(column, "chosen and rejected share no leading message, so there is no prompt",
                           "no shared prompt")
        if isinstance(chosen, str) and 0 < n < min(len(chosen), len(rejected)) and chosen[n - 1] == " ":
            n -= 1
    return chosen[:n], chosen[n:], rejected[n:]


def common_prefix_length(a: Sequence, b: Sequence) -> int:
    """How many leading items (characters, messages, token ids) ``a`` and ``b`` share."""
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def is_empty(value: str | list) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(message["content"].strip() for message in value)


def _type(value: object) -> str:
    return "null" if value is None else type(value).__name__
