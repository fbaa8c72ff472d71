"""Preference rows in the formats people already have, validated before anything is tokenised.

Paired (each row becomes a :class:`~prefmodule.data.records.Pair`):
- ``standard``: ``prompt``, ``chosen``, ``rejected`` strings (optional ``score_chosen``/``score_rejected``).
- ``conversational``: the same three as lists of ``{"role", "content"}`` messages (system messages, tool calls
  and tool results included; a ``tools`` column goes to the chat template).
- ``implicit``: only ``chosen`` and ``rejected``, each the whole text or dialogue; the prompt is their longest
  common prefix (TRL's ``extract_prompt``), and Anthropic HH-style ``\\n\\nHuman: ... \\n\\nAssistant:`` texts are
  split at the last assistant turn.
- ``sharegpt``, ``alpaca``: LLaMA-Factory's and axolotl's (see :mod:`prefmodule.data.llamafactory`).
- ``ratings``: several rated completions per prompt, turned into a pair (see :mod:`prefmodule.data.ratings`).

Unpaired (each row becomes an :class:`~prefmodule.data.records.Unpaired` row), ``unpaired``:
``prompt``, ``completion`` (texts or messages) and ``label``; or ``messages`` and ``label``, the last
message being the (assistant) completion, as LLaMA-Factory's KTO files (``columns: {kto_tag: label}``).

Prompts alone (each row a :class:`~prefmodule.data.records.Prompt`), ``prompts``: a ``prompt`` (text or messages,
optional ``tools``), what on-policy sampling completes; the prompts of any other format serve as well.

``auto`` detects the format from the dataset's first rows (up to 1,000) by the columns they have; every row
is then checked against it. A row that cannot be used is reported with its file, line or row, and field;
nothing is dropped silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from prefmodule.data.llamafactory import AlpacaRows, ShareGPTRows, converted
from prefmodule.data.messages import OPENAI_TAGS, SHAREGPT_TAGS, is_empty, is_messages, type_name
from prefmodule.data.ratings import RatedRows
from prefmodule.data.records import (
    Columns, Pair, Prompt, RowError, Unpaired, field, margin_field, messages_field, score_field, text_field,
    tools_field,
)
from prefmodule.data.sources import BrokenRow
from prefmodule.errors import ConfigError, DataError

Format = Literal["auto", "standard", "conversational", "implicit", "sharegpt", "alpaca", "ratings", "unpaired",
                 "prompts"]
FORMATS = Format.__args__
PairsFromRatings = Literal["best_worst", "best_random"]
COLUMN_TARGETS = ("prompt", "chosen", "rejected", "completion", "label", "messages", "conversations", "system",
                  "tools", "instruction", "input", "history", "output", "completions", "response", "score",
                  "scores", "score_chosen", "score_rejected", "margin")
DETECTION_ROWS = 1000
MAX_REPORTED = 20
HH_ASSISTANT = "\n\nAssistant:"
LABELS = {True: True, False: False, "true": True, "false": False, "1": True, "0": False}  # 1 and 0 equal True, False


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

    def __init__(self, bad: list[BadRow], total: int, count: int | None = None):
        self.bad, self.count = bad, count or len(bad)
        super().__init__(
            f"{self.count} of {total} rows are malformed:\n  {describe(bad, self.count)}\n"
            "Fix them, or set `on_bad_rows: skip` to train on the good rows only."
        )


def describe(bad: list[BadRow], count: int | None = None) -> str:
    """The first ``MAX_REPORTED`` bad rows, one a line, and how many more there are (of ``count``)."""
    count = count or len(bad)
    listed = "\n  ".join(str(b) for b in bad[:MAX_REPORTED])
    return listed + (f"\n  ... and {count - MAX_REPORTED} more" if count > MAX_REPORTED else "")


def check_format_settings(format: str, columns: dict[str, str] | None, tags: dict[str, str] | None = None,
                   option: str = "data") -> None:
    if format not in FORMATS:
        raise ConfigError(f"{option}.format must be one of {list(FORMATS)}, got {format!r}")
    if columns is not None and not (isinstance(columns, dict) and all(isinstance(k, str) for k in columns)):
        raise ConfigError(f"{option}.columns must map the dataset's column names to ours, e.g. "
                          f"{{question: prompt}}; got {columns!r}")
    targets = list((columns or {}).values())
    if set(targets) - set(COLUMN_TARGETS) or len(set(targets)) < len(targets):
        raise ConfigError(f"{option}.columns must map dataset columns to distinct names among "
                          f"{list(COLUMN_TARGETS)}, e.g. {{question: prompt}}; got {columns}")
    unknown = sorted(set(tags or {}) - set(SHAREGPT_TAGS))
    if unknown or not all(isinstance(v, str) for v in (tags or {}).values()):
        raise ConfigError(f"{option}.tags takes string values for {list(SHAREGPT_TAGS)} (LLaMA-Factory's names); "
                          f"got {tags!r}")


# ----- detection -------------------------------------------------------------------------------------------
def detect_format(rows: list, columns: Columns) -> str:
    """The format of a dataset from its first rows: by the columns present, paired or unpaired."""
    objects = [row for row in rows if isinstance(row, dict)]
    has = lambda *targets: columns.present(objects, *targets)  # noqa: E731
    if has("prompt") and not any(has(t) for t in ("chosen", "rejected", "completion", "completions", "label")):
        return "prompts"
    if has("label") and not has("chosen", "rejected"):
        return "unpaired"
    if has("conversations") or (has("messages") and has("chosen", "rejected")):
        return "sharegpt"
    if has("instruction") and not has("completions"):
        return "alpaca"
    if has("completions"):
        return "ratings"
    prompt, chosen = columns.first(objects, "prompt"), columns.first(objects, "chosen")
    if prompt is None or is_messages(prompt) != is_messages(chosen):  # TRL: a text prompt beside messages
        return "implicit"
    return "conversational" if is_messages(chosen) else "standard"


def make_checker(rows: list, format: Format, columns: dict[str, str] | None = None,
                 tags: dict[str, str] | None = None, chat: bool = True,
                 pairs_from_ratings: PairsFromRatings = "best_worst", seed: int = 0):
    """The checker of a dataset whose first rows are ``rows``; ``chat``: whether a chat template is at hand
    (Alpaca rows render through it, else as text)."""
    check_format_settings(format, columns, tags)
    names = Columns(columns)
    sample = [row for row in rows[:DETECTION_ROWS] if isinstance(row, dict)]
    format = detect_format(sample, names) if format == "auto" else format
    if format == "sharegpt":
        return ShareGPTRows(sample, names, tags)
    if format == "alpaca":
        return AlpacaRows(names, chat)
    if format == "ratings":
        return RatedRows(sample, names, pairs_from_ratings, seed)
    if format == "unpaired":
        return UnpairedRows(sample, names, tags)
    if format == "prompts":
        return PromptRows(sample, names)
    return PromptResponses(sample, names, format)


def check_row(checker, row: object) -> Pair | Unpaired:
    """``checker.check(row)``, after what no format accepts: an unreadable row or one that is not an object."""
    if isinstance(row, BrokenRow):
        raise RowError(None, row.message, row.kind)
    if not isinstance(row, dict):
        raise RowError(None, f"expected an object with fields {checker.needed}, got {type_name(row)}", "wrong type")
    return checker.check(row)


# ----- prompt / chosen / rejected --------------------------------------------------------------------------
class PromptResponses:
    """``standard``, ``conversational`` and ``implicit`` rows."""

    unpaired = False

    def __init__(self, sample: list[dict], columns: Columns, format: str):
        self.format, self.column = format, columns
        first_chosen = columns.first(sample, "chosen")
        self.conversational = format == "conversational" or (format == "implicit" and is_messages(first_chosen))
        self.name = format + (" (messages)" if format == "implicit" and self.conversational else "")
        self.names = ("chosen", "rejected") if format == "implicit" else ("prompt", "chosen", "rejected")
        self.needed = [columns(n) for n in self.names]
        self.tools, self.scores = columns("tools"), (columns("score_chosen"), columns("score_rejected"))

    def check(self, row: dict) -> Pair:
        values = dict(zip(self.names, (self._value(row, column) for column in self.needed)))
        column = self.column
        if values["chosen"] == values["rejected"]:
            raise RowError(column("rejected"), "identical to chosen", "identical responses")
        if self.format == "implicit":
            values["prompt"], values["chosen"], values["rejected"] = extract_prompt(
                values["chosen"], values["rejected"], column("chosen"))
        for name in ("chosen", "rejected"):
            if is_empty(values[name]):
                raise RowError(column(name), "empty response", "empty response")
        if self.conversational and not values["prompt"]:
            raise RowError(column("prompt"), "no prompt messages", "empty prompt")
        tools = tools_field(row, self.tools) if self.tools in row else None
        scores = scores_of(row, *self.scores) if self.scores[0] in row else None
        return Pair(values["prompt"], values["chosen"], values["rejected"], tools, scores,
                    margin_field(row, column("margin")))

    def _value(self, row: dict, column: str) -> str | list:
        if self.conversational:
            return messages_field(row, column, self.format)
        return text_field(row, column, self.format)


def scores_of(row: dict, chosen_column: str, rejected_column: str) -> tuple[float, float] | None:
    """``(score_chosen, score_rejected)`` when the row has both (UltraFeedback-binarized style), else None."""
    chosen, rejected = row.get(chosen_column), row.get(rejected_column)
    if chosen is None or rejected is None:
        return None
    return score_field(chosen, chosen_column), score_field(rejected, rejected_column)


# ----- unpaired ----------------------------------------------------------------------------------------------
class UnpairedRows:
    """``{prompt, completion, label}`` (texts or messages), or ``{messages, label}`` ending with the completion."""

    unpaired = True

    def __init__(self, sample: list[dict], columns: Columns, tags: dict[str, str] | None):
        self.column = columns
        self.implicit = not columns.present(sample, "prompt") and columns.present(sample, "messages")
        first = columns.first(sample, "messages" if self.implicit else "completion")
        self.tags = None
        if self.implicit and tags is None and not is_messages(first):
            self.tags = SHAREGPT_TAGS  # LLaMA-Factory's ShareGPT turns: {from, value}
        elif tags is not None:
            self.tags = {**(OPENAI_TAGS if is_messages(first) else SHAREGPT_TAGS), **tags}
        self.conversational = self.implicit or is_messages(first)
        self.name = "unpaired" + (" (implicit messages)" if self.implicit else " (messages)" if
                                  self.conversational else "")
        self.needed = [columns(n) for n in (("messages", "label") if self.implicit else
                                            ("prompt", "completion", "label"))]

    def check(self, row: dict) -> Unpaired:
        column = self.column
        label = field(row, column("label"))
        key = label.strip().lower() if isinstance(label, str) else label
        if isinstance(key, float) or key not in LABELS:  # a float 1.0 is no label: a score in the wrong column
            raise RowError(column("label"), f"expected true/false (or 1/0), got {label!r:.40}", "wrong type")
        if self.implicit:
            prompt, completion = self._split_messages(row, column("messages"))
        elif self.conversational:
            prompt = messages_field(row, column("prompt"), "unpaired")
            completion = messages_field(row, column("completion"), "unpaired")
        else:
            prompt = text_field(row, column("prompt"), "unpaired")
            completion = text_field(row, column("completion"), "unpaired")
        if is_empty(completion):
            raise RowError(column("messages" if self.implicit else "completion"), "empty response", "empty response")
        if self.conversational and not prompt:
            raise RowError(column("messages" if self.implicit else "prompt"), "no prompt messages", "empty prompt")
        return Unpaired(prompt, completion, LABELS[key], tools_field(row, column("tools")))

    def _split_messages(self, row: dict, column: str) -> tuple[list, list]:
        if self.tags is not None:
            messages = converted(field(row, column), self.tags, column)
        else:
            messages = messages_field(row, column, "unpaired")
        if not messages or messages[-1]["role"] != "assistant":
            last = messages[-1]["role"] if messages else "nothing"
            raise RowError(column, f"the last message is the completion and should be the assistant's, got {last}",
                           "wrong type")
        return messages[:-1], messages[-1:]


# ----- prompts alone -----------------------------------------------------------------------------------------
class PromptRows:
    """``{prompt}`` rows, a text or chat messages (optional ``tools``): prompts to complete, for sampling."""

    unpaired = False
    prompts = True

    def __init__(self, sample: list[dict], columns: Columns):
        self.column = columns
        self.conversational = is_messages(columns.first(sample, "prompt"))
        self.name = "prompts" + (" (messages)" if self.conversational else "")
        self.needed = [columns("prompt")]

    def check(self, row: dict) -> Prompt:
        column = self.column("prompt")
        if self.conversational:
            prompt = messages_field(row, column, "prompts")
            if not prompt:
                raise RowError(column, "no prompt messages", "empty prompt")
        else:
            prompt = text_field(row, column, "prompts")
        return Prompt(prompt, tools_field(row, self.column("tools")))


def unpair(pairs: list[Pair]) -> list[Unpaired]:
    """Pairs as unpaired rows in the order of TRL's ``unpair_preference_dataset`` over a block of pairs (TRL maps
    blocks of 1,000): every pair's chosen response (desirable), then every pair's rejected one (undesirable)."""
    return ([Unpaired(p.prompt, p.chosen, True, p.tools) for p in pairs]
            + [Unpaired(p.prompt, p.rejected, False, p.tools, side=1) for p in pairs])


# ----- implicit prompts ----------------------------------------------------------------------------------------
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

