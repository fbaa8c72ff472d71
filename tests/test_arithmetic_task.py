"""Tests for scripts/arithmetic_task.py and the arithmetic prompts shipped under asset://arithmetic."""

from __future__ import annotations

import filecmp
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))

import arithmetic_task  # noqa: E402
from conftest import read_jsonl  # noqa: E402

from prefmodule.paths import resolve  # noqa: E402
from prefmodule.sampling.rules import answer_format, exact_match  # noqa: E402

PROBLEM = re.compile(r"(\d+) ([+-]) (\d+)")
SHIPPED = {"train.jsonl": 200, "val.jsonl": 50, "train_text.jsonl": 200, "val_text.jsonl": 50}


def problem_of(row: dict) -> tuple[int, str, int]:
    prompt = row["prompt"] if isinstance(row["prompt"], str) else row["prompt"][-1]["content"]
    a, op, b = PROBLEM.search(prompt).groups()
    return int(a), op, int(b)


def key(problem):
    a, op, b = problem
    return (op, min(a, b), max(a, b)) if op == "+" else problem


@pytest.mark.parametrize("name, rows", SHIPPED.items())
def test_shipped_files_resolve_and_answers_are_right(name, rows):
    data = read_jsonl(resolve(f"asset://arithmetic/{name}"))
    assert len(data) == rows
    for row in data:
        a, op, b = problem_of(row)
        assert 10 <= a <= 99 and 10 <= b <= 99
        assert row["answer"] == str(a + b if op == "+" else a - b) and int(row["answer"]) >= 0
        assert isinstance(row["prompt"], str) == name.endswith("_text.jsonl")
    ops = [problem_of(row)[1] for row in data]
    assert abs(ops.count("+") - ops.count("-")) <= 1


@pytest.mark.parametrize("suffix", ["", "_text"])
def test_splits_are_disjoint_and_text_matches_messages(suffix):
    train = [problem_of(r) for r in read_jsonl(resolve(f"asset://arithmetic/train{suffix}.jsonl"))]
    val = [problem_of(r) for r in read_jsonl(resolve(f"asset://arithmetic/val{suffix}.jsonl"))]
    assert len({key(p) for p in train + val}) == len(train) + len(val)  # no repeats, none shared
    messages = [problem_of(r) for r in read_jsonl(resolve("asset://arithmetic/train.jsonl"))]
    assert train == messages


def test_rebuild_is_byte_identical(tmp_path):
    for suffix, text in (("", False), ("_text", True)):
        arithmetic_task.write_task(tmp_path, 200, 50, text=text, suffix=suffix)
    for name in SHIPPED:
        assert filecmp.cmp(tmp_path / name, resolve(f"asset://arithmetic/{name}"), shallow=False), name


def test_cli_writes_the_requested_split(tmp_path, capsys):
    arithmetic_task.main(["--out", str(tmp_path), "--train", "30", "--val", "7", "--seed", "3", "--text"])
    train, val = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "val.jsonl")
    assert len(train) == 30 and len(val) == 7 and isinstance(train[0]["prompt"], str)
    assert train[0]["prompt"].startswith("Question: ") and train[0]["prompt"].endswith("\nAnswer:")
    assert "30 training rows" in capsys.readouterr().out


def test_rules_score_the_task():
    rows = read_jsonl(resolve("asset://arithmetic/val.jsonl"))[:5]
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    right = [f"Adding up, I get {a}. The answer is {a}." for a in answers]
    wrong = [f"The answer is {int(a) + 1}." for a in answers]
    assert exact_match(prompts, right, answer=answers) == [1.0] * 5
    assert exact_match(prompts, wrong, answer=answers) == [0.0] * 5
    assert answer_format(prompts, right + wrong) == [1.0] * 10
    assert answer_format(prompts, [f"{a}" for a in answers]) == [0.0] * 5
