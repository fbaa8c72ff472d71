"""What every format's rows become once checked: a :class:`Pair` or an :class:`Unpaired` row, and the two
ways a row can fail (:class:`RowError`, a malformed row; :class:`RowDropped`, a well-formed row with
nothing to learn from, such as tied ratings)."""

from __future__ import annotations

from dataclasses import dataclass

from prefmodule.data.messages import MessageError, message_problem, parse_tools, type_name


@dataclass(slots=True)
class Pair:
    """A prompt with a preferred and a dispreferred response: texts, or lists of chat messages."""

    prompt: str | list
    chosen: str | list
    rejected: str | list
    tools: list | None = None  # function schemas for the chat template
    scores: tuple[float, float] | None = None  # (score_chosen, score_rejected) when the data rates them
    margin: float | None = None  # the data's ``margin`` column (a reward model's Bradley-Terry margin)


@dataclass(slots=True)
class Unpaired:
    """A prompt with one response labelled desirable (True) or undesirable (False)."""

    prompt: str | list
    completion: str | list
    label: bool
    tools: list | None = None
    side: int = 0  # 1: the rejected response of a pair (see ``unpair``)


@dataclass(slots=True)
class Prompt:
    """A prompt alone (text or chat messages), to complete: what on-policy sampling reads."""

    prompt: str | list
    tools: list | None = None


class RowError(ValueError):
    """Why a row cannot be used: the field (as the dataset names it), the reason and its category."""

    def __init__(self, field: str | None, reason: str, kind: str):
        super().__init__(reason)
        self.field, self.reason, self.kind = field, reason, kind


class RowDropped(Exception):
    """A well-formed row that yields no pair (its reason is counted in the summary, never an error)."""

    def __init__(self, kind: str):
        super().__init__(kind)
        self.kind = kind


class Columns:
    """A dataset's own column names for the names a format reads: ``{"question": "prompt"}`` maps ``prompt``."""

    def __init__(self, mapping: dict[str, str] | None):
        self.names = {target: name for name, target in (mapping or {}).items()}

    def __call__(self, target: str) -> str:
        return self.names.get(target, target)

    def present(self, rows: list[dict], *targets: str) -> bool:
        """Whether any of ``rows`` has a value in any of the columns of ``targets``."""
        return any(row.get(self(target)) is not None for row in rows for target in targets)

    def first(self, rows: list[dict], target: str) -> object:
        """The first value of ``target``'s column among ``rows`` (None when no row has one)."""
        return next((row[self(target)] for row in rows if row.get(self(target)) is not None), None)


def field(row: dict, column: str) -> object:
    if column not in row:
        raise RowError(column, "missing", "missing field")
    return row[column]


def text_field(row: dict, column: str, format: str, optional: bool = False) -> str:
    value = row.get(column) if optional else field(row, column)
    if optional and value is None:
        return ""
    if not isinstance(value, str):
        raise RowError(column, f"expected a string ({format} format), got {type_name(value)}", "wrong type")
    return value


def messages_field(row: dict, column: str, format: str) -> list:
    value = field(row, column)
    problem = message_problem(value, format)
    if problem:
        raise RowError(column, problem, "wrong type")
    return value


def tools_field(row: dict, column: str) -> list | None:
    try:
        return parse_tools(row.get(column))
    except MessageError as error:
        raise RowError(column, str(error), "wrong type") from None


def margin_field(row: dict, column: str) -> float | None:
    """A row's ``margin`` (any finite number), ``None`` when it has none."""
    value = row.get(column)
    return None if value is None else score_field(value, column)


def score_field(value: object, column: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) == float("inf"):
        raise RowError(column, f"expected a finite number, got {value!r:.40}", "wrong type")
    return float(value)
