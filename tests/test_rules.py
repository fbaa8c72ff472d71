"""Tests for the verifiable rewards of prefmodule.sampling.rules: exact_match, answer_format, politeness's calls."""

from __future__ import annotations

import pytest

from prefmodule.sampling.rules import NUMBERS, answer_format, exact_match, politeness


@pytest.mark.parametrize("text, numbers", [
    ("23 + 58 = 81", ["23", "58", "81"]),
    ("The answer is 81.", ["81"]),  # a full stop is not a decimal point
    ("23 - 58 = -35", ["23", "58", "-35"]),  # a minus sign after a space
    ("23-58", ["23", "58"]),  # a hyphen between digits is not a sign
    ("item x-5", ["5"]),
    ("(-3)", ["-3"]),
    ("1,234,567 dollars", ["1,234,567"]),
    ("-1,234.50", ["-1,234.50"]),
    ("pi is 3.14.", ["3.14"]),
    ("5,6 and 7", ["5", "6", "7"]),  # a comma before fewer than three digits separates numbers
    ("12.5% of v2", ["12.5", "2"]),
    ("no number here", []),
])  # fmt: skip
def test_numbers_as_written(text, numbers):
    assert NUMBERS.findall(text) == numbers


def test_exact_match_last_number_numerically():
    completions = [
        "23 + 58 = 81. The answer is 81.",
        "81.0",
        "The total is 1,234",
        "58 - 93 = -35",
        "The answer is 81, or maybe 80.",  # the last number counts
        "I don't know.",
        "",
        "0.5",
    ]
    answers = ["81", 81, 1234, "-35", 81, "7", "7", 0.5]
    assert exact_match([None] * len(completions), completions, answer=answers) == [1, 1, 1, 1, 0, 0, 0, 1]


def test_exact_match_answer_forms():
    # a text answer's last number is its value (GSM8K's "... #### 72"); thousands separators and decimals in it too
    assert exact_match(["q"] * 4, ["72", "1234", "-2.5", "3"],
                       answer=["48 / 2 = 24, 48 + 24 = 72\n#### 72", "1,234", "-2.50", " 3 "]) == [1, 1, 1, 1]
    assert exact_match(["q"], ["10"], answer=[10.0]) == [1.0]
    assert exact_match(["q"], ["-10"], answer=[10]) == [0.0]


def test_exact_match_none_without_an_answer():
    got = exact_match(["q"] * 5, ["81"] * 5, answer=[None, float("nan"), "", "no number", True])
    assert got == [None] * 5
    with pytest.raises(ValueError, match="answer"):
        exact_match(["q"], ["81"])  # no answer column at all


def test_exact_match_ignores_other_columns():
    assert exact_match(["q"], ["81"], answer=["81"], completion_ids=[[1, 2]], source=["x"]) == [1.0]


@pytest.mark.parametrize("completion, score", [
    ("The answer is 81.", 1.0),
    ("23 + 58 = 81. The answer is 81.", 1.0),
    ("Let me add.\n23 + 58 = 81\nThe answer is 81", 1.0),
    ("So the answer is 81.", 1.0),
    ("the answer is -1,234.5.", 1.0),
    ("The answer is 81.  \n", 1.0),
    ("The answer is 81 apples.", 0.0),
    ("The answer is 81. Hope this helps!", 0.0),
    ("The answer is eighty-one.", 0.0),
    ("The answer is 81 or 82.", 0.0),
    ("#### 81", 0.0),
    ("81", 0.0),
    ("", 0.0),
])  # fmt: skip
def test_answer_format(completion, score):
    assert answer_format(["q"], [completion]) == [score]
    assert answer_format(["q"], [completion], answer=["1"], completion_ids=[[0]]) == [score]  # columns ignored


def test_politeness_two_and_more_arguments():
    prompts = ["How do I bake bread?", [{"role": "user", "content": "How do I bake bread?"}]]
    completions = ["Happy to help! Bake the bread at 220C.", "Whatever, google it."]
    two = politeness(prompts, completions)
    assert two == politeness(prompts, completions, answer=[None, None], completion_ids=[[1], [2]])
    assert two[0] > 0 > two[1]
