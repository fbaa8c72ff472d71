import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from prefmodule.paths import resolve  # noqa: E402

TINY_MODEL = "asset://tiny-llama"


def read_jsonl(path):
    with open(path) as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path, rows):
    with open(path, "w") as handle:
        for row in rows:
            handle.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def demo_rows():
    return read_jsonl(resolve("asset://demo/train.jsonl"))


@pytest.fixture
def small_data(tmp_path, demo_rows):
    """A 32-pair train file and a 16-pair val file cut from the shipped demo data."""
    val_rows = read_jsonl(resolve("asset://demo/val.jsonl"))
    return write_jsonl(tmp_path / "train.jsonl", demo_rows[:32]), write_jsonl(tmp_path / "val.jsonl", val_rows[:16])
