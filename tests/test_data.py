"""Reading, validating, tokenising and batching preference pairs."""

import pytest
import torch

from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.datamodule import PreferenceDataModule, split_rows
from prefmodule.data.formats import DataValidationError, read_jsonl
from prefmodule.data.tokenize import tokenize_pair
from prefmodule.hf import load_tokenizer

from conftest import TINY_MODEL, write_jsonl

GOOD = {"prompt": "Hi?", "chosen": "Hello, how can I help?", "rejected": "Go away."}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_MODEL)


def test_every_bad_row_is_named_with_file_line_and_field(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        GOOD,
        '{"prompt": "x", "chosen": "y"',  # line 2: broken JSON
        {"prompt": "x", "chosen": "y"},  # line 3: missing rejected
        {"prompt": "x", "chosen": 5, "rejected": "z"},  # line 4: wrong type
        {"prompt": "x", "chosen": "  ", "rejected": "z"},  # line 5: empty response
        {"prompt": "x", "chosen": "same", "rejected": "same"},  # line 6: identical
        GOOD,
    ])
    with pytest.raises(DataValidationError) as caught:
        read_jsonl(path)
    message = str(caught.value)
    assert "5 of 7 rows are malformed" in message
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:3: field 'rejected': missing" in message
    assert f"{path}:4: field 'chosen': expected a string, got int" in message
    assert f"{path}:5: field 'chosen': empty response" in message
    assert f"{path}:6: field 'rejected': identical to chosen" in message
    assert "on_bad_rows: skip" in message

    skipped = read_jsonl(path, on_bad_rows="skip")
    assert skipped.rows == [GOOD, GOOD] and len(skipped.bad) == 5 and skipped.total == 7


def test_error_lists_first_twenty_and_the_count(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "x"}] * 30)
    message = str(pytest.raises(DataValidationError, read_jsonl, path).value)
    assert "30 of 30 rows" in message and "... and 10 more" in message
    assert f"{path}:20:" in message and f"{path}:21:" not in message


def test_bad_data_fails_before_training(tmp_path):
    from prefmodule.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "x", "chosen": "y"}])
    with pytest.raises(DataValidationError, match="bad.jsonl:2: field 'rejected': missing"):
        main(["fit", "--model=prefmodule.ORPOModule", f"--model.model={TINY_MODEL}", f"--data.train={bad}",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1"])


def test_tokenisation_matches_trl(tokenizer, demo_rows):
    """Same ids as TRL's DPOTrainer tokenisation of the standard format (BOS from the tokenizer, EOS added)."""
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from datasets import Dataset
    from types import SimpleNamespace

    rows = demo_rows[:8]
    args = SimpleNamespace(dataset_num_proc=None, max_length=None, truncation_mode="keep_start")
    stand_in = SimpleNamespace(_tokenizer=tokenizer)
    expected = trl_dpo.DPOTrainer._prepare_dataset(stand_in, Dataset.from_list(rows), tokenizer, args, "train")
    for row, theirs in zip(rows, expected):
        ours = tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"])
        assert ours["prompt_ids"] == theirs["prompt_ids"]
        assert ours["chosen_ids"] == theirs["chosen_ids"]
        assert ours["rejected_ids"] == theirs["rejected_ids"]
        assert ours["prompt_ids"][0] == tokenizer.bos_token_id
        assert ours["chosen_ids"][-1] == tokenizer.eos_token_id


def test_eos_not_doubled_and_truncation_keeps_start(tokenizer):
    with_eos = tokenize_pair(tokenizer, "Q?", "yes" + tokenizer.eos_token, "no")
    assert with_eos["chosen_ids"].count(tokenizer.eos_token_id) == 1
    full = tokenize_pair(tokenizer, "Tell me a story", "Once upon a time there was a tiny model.", "No.")
    cut = tokenize_pair(tokenizer, "Tell me a story", "Once upon a time there was a tiny model.", "No.",
                        max_length=len(full["prompt_ids"]) + 3)
    assert cut["chosen_ids"] == full["chosen_ids"][:3]
    assert cut["rejected_ids"] == full["rejected_ids"][:3]
    assert tokenize_pair(tokenizer, "Tell me a story", "a", "b", max_length=len(full["prompt_ids"])) is None


def test_collator_masks_prompt_and_padding():
    pairs = [{"index": 0, "prompt_ids": [1, 2, 3], "chosen_ids": [4, 5], "rejected_ids": [6]},
             {"index": 1, "prompt_ids": [7, 8], "chosen_ids": [9], "rejected_ids": [10, 11]}]
    batch = PreferenceCollator(pad_token_id=0)(pairs)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 9, 0, 0], [1, 2, 3, 6, 0], [7, 8, 10, 11, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    i = -100
    assert batch["labels"].tolist() == [[i, i, i, 4, 5], [i, i, 9, i, i], [i, i, i, 6, i], [i, i, 10, 11, i]]
    assert batch["index"].tolist() == [0, 1]


def test_seeded_val_split_is_disjoint_and_repeatable():
    rows = [{"prompt": str(i)} for i in range(100)]
    train, held = split_rows(rows, 0.1, seed=3)
    assert len(held) == 10 and len(train) == 90
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}
    assert split_rows(rows, 0.1, seed=3) == (train, held)
    assert split_rows(rows, 0.1, seed=4)[1] != held


def test_datamodule_val_fraction_and_batches(tmp_path, demo_rows, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", demo_rows[:40])
    data = PreferenceDataModule(train=path, val_fraction=0.25, batch_size=5, tokenizer=TINY_MODEL)
    data.setup("fit")
    assert len(data.datasets["train"]) == 30 and len(data.datasets["val"]) == 10
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape[0] == 10
    assert (batch["labels"] != -100).sum() > 0
    assert torch.equal(batch["attention_mask"].sum(1) > 0, torch.ones(10, dtype=torch.bool))
