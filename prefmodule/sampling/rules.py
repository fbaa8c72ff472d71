"""Example rule-based rewards (verifiable rewards), for ``reward: prefmodule.sampling.rules:<name>``: each takes the
prompts, the completions and, as keyword arguments, the rows' other columns (one list each, e.g. ``answer``), and
returns one float per completion, or ``None`` for a completion it cannot judge."""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

# The shipped demo data's chosen answers are helpful and polite, its rejected ones rude or dismissive.
POLITE = frozenset({"glad", "happy", "help", "hope", "sure", "thanks", "thank", "great", "please", "absolutely",
                    "tip", "tips", "welcome", "enjoy"})
RUDE = frozenset({"seriously", "whatever", "nobody", "boring", "problem", "stupid", "job", "figure", "google",
                  "waste", "bother"})
WORDS = re.compile(r"[a-z']+")


def politeness(prompts: list, completions: list[str], **columns) -> list[float]:
    """A quarter point per distinct polite word and minus a quarter per distinct rude one, half a point for
    sharing a content word (five letters or more) with the prompt (on topic), minus the share of repeated words
    (so repeating a polite word earns nothing; an empty completion scores -1)."""
    scores = []
    for prompt, completion in zip(prompts, completions):
        words = WORDS.findall(completion.lower())
        distinct = set(words)
        asked = {word for word in WORDS.findall(_last_text(prompt).lower()) if len(word) > 4}
        repeated = 1 - len(distinct) / len(words) if words else 1.0
        scores.append(0.25 * (len(distinct & POLITE) - len(distinct & RUDE)) + 0.5 * bool(asked & distinct) - repeated)
    return scores


# A number as people write it: an optional minus sign (not a hyphen inside a word: "x-5" is 5), then digits with or
# without thousands separators ("1,234,567"), then optional decimals ("3.25"; a full stop after "42." is not one).
NUMBER = r"(?:(?<![\w-])-)?(?<![\d.])(?:\d{1,3}(?:,\d{3})+(?![\d,])|\d+)(?:\.\d+)?"
NUMBERS = re.compile(NUMBER)
FINAL_ANSWER = re.compile(rf"(?:^|[.!?\n])[^.!?\n]*\bthe answer is\s+{NUMBER}\s*\.?\s*$", re.IGNORECASE)


def exact_match(prompts: list, completions: list[str], answer: list | None = None, **_) -> list[float | None]:
    """1.0 when the last number in the completion equals the row's ``answer`` numerically, else 0.0; ``None`` for a
    row without an answer (``None``, NaN, or a text with no number in it).

    Numbers are integers or decimals, negative or not, with or without thousands separators: "-1,234.50" equals
    the answer ``-1234.5``. ``answer`` may be a number or a text; a text's last number is its value, so GSM8K's
    worked answers ("... #### 72") work as they are. Reads the data's ``answer`` column."""
    if answer is None:
        raise ValueError("exact_match compares with each row's answer: the prompts data needs an 'answer' column")
    scores: list[float | None] = []
    for completion, expected in zip(completions, answer):
        target = _value(expected)
        if target is None:
            scores.append(None)
            continue
        found = NUMBERS.findall(completion or "")
        scores.append(float(bool(found) and _number(found[-1]) == target))
    return scores


def answer_format(prompts: list, completions: list[str], **_) -> list[float]:
    """1.0 when the completion's last sentence (or line) ends with "the answer is N" (any case; a full stop after
    it optional; N one number as :func:`exact_match` reads it), else 0.0.

    For example "23 + 58 = 81. The answer is 81.", "So the answer is 81" and "The answer is -1,234." score 1;
    "The answer is 81 apples.", "The answer is 81. Hope this helps!", "The answer is eighty-one." and "#### 81"
    score 0. It checks the form, not the value (:func:`exact_match` checks the value)."""
    return [float(FINAL_ANSWER.search((completion or "").strip()) is not None) for completion in completions]


def _number(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


def _value(answer) -> Decimal | None:
    """An answer's numeric value: a number as it is, a text's last number; ``None`` when there is none."""
    if answer is None or isinstance(answer, bool):
        return None
    if isinstance(answer, (int, float)):
        return Decimal(str(answer)) if math.isfinite(answer) else None
    found = NUMBERS.findall(str(answer))
    try:
        return _number(found[-1]) if found else None
    except InvalidOperation:  # pragma: no cover - NUMBER only matches valid decimals
        return None


def _last_text(prompt: str | list) -> str:
    """A text prompt, or the last message's content of a chat prompt."""
    return prompt if isinstance(prompt, str) else str(prompt[-1].get("content", ""))
