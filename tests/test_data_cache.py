"""The tokenised-data cache: hits, invalidation by data, tokenizer and settings, and corrupt entries."""

import logging
import shutil

import numpy as np
import pytest

from prefmodule.data.formats import DataValidationError
from prefmodule.models.loading import load_tokenizer
from prefmodule.paths import resolve

from test_data import GOOD, pairs_of, setup_fit, summary
from conftest import TINY_MODEL, write_jsonl


def load(tmp_path, caplog, train, **kwargs):
    """Set up ``fit`` and return ``(pairs, status)``: the pairs and the cache status of the start summary."""
    caplog.clear()
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, train, **kwargs)
    line = next(line for line in summary(caplog).splitlines() if "rows read" in line)
    return pairs_of(data), line.split("; ")[-1]


def entries(tmp_path):
    return sorted(p.name for p in (tmp_path / "cache").iterdir())


def test_second_run_is_a_cache_hit_with_the_same_pairs(tmp_path, caplog, demo_rows):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:20])
    first, status = load(tmp_path, caplog, path)
    assert status.startswith("cache miss, saved to ")
    second, status = load(tmp_path, caplog, path)
    assert status == f"cache hit: {tmp_path / 'cache' / entries(tmp_path)[0]}"
    assert second == first and len(first) == 20
    report = summary(caplog)
    assert "20 rows read, 20 pairs kept" in report and "p50=" in report  # the summary is shown on a hit too


def test_changed_data_or_settings_miss_and_the_same_tokenizer_elsewhere_hits(tmp_path, caplog, demo_rows):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:20])
    base, _ = load(tmp_path, caplog, path)
    write_jsonl(tmp_path / "train.jsonl", demo_rows[:19] + [GOOD])  # same file, one row changed
    changed, status = load(tmp_path, caplog, path)
    assert status.startswith("cache miss") and changed[-1] != base[-1] and changed[:19] == base[:19]
    for setting in ({"max_length": 20}, {"max_length": 40, "max_prompt_length": 8},
                    {"max_length": 40, "max_prompt_length": 8, "truncation_mode": "keep_start"},
                    {"format": "implicit"}):
        _, status = load(tmp_path, caplog, path, **setting)
        assert status.startswith("cache miss"), setting
    assert len(entries(tmp_path)) == 6

    copy = tmp_path / "tokenizer-copy"
    shutil.copytree(resolve(TINY_MODEL), copy)
    _, status = load(tmp_path, caplog, path, tokenizer=str(copy))
    assert status.startswith("cache hit")  # identity, not path
    tokenizer = load_tokenizer(str(copy))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    _, status = load(tmp_path, caplog, path, tokenizer=tokenizer)
    assert status.startswith("cache miss")
    tokenizer = load_tokenizer(str(copy))
    tokenizer.add_tokens(["Hello"])  # in the last row
    retokenised, status = load(tmp_path, caplog, path, tokenizer=tokenizer)
    assert status.startswith("cache miss") and retokenised != changed


@pytest.mark.parametrize("damage", ["flip a token", "truncate an array", "break meta.json", "half-written"])
def test_corrupt_entries_are_never_used(tmp_path, caplog, demo_rows, damage):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:20])
    expected, _ = load(tmp_path, caplog, path)
    entry = tmp_path / "cache" / entries(tmp_path)[0]
    tokens = entry / "chosen_tokens.npy"
    if damage == "flip a token":
        values = np.load(tokens)
        values[3] += 1
        np.save(tokens, values)
    elif damage == "truncate an array":
        tokens.write_bytes(tokens.read_bytes()[:-12])
    elif damage == "break meta.json":
        (entry / "meta.json").write_text('{"version": 1, "key"')
    else:
        (entry / "meta.json").unlink()
    with pytest.warns(UserWarning, match="tokenising again"):
        pairs, status = load(tmp_path, caplog, path)
    assert status.startswith("cache miss, saved to") and pairs == expected
    _, status = load(tmp_path, caplog, path)
    assert status.startswith("cache hit")  # the rebuilt entry


def test_a_cached_skip_run_still_stops_a_strict_run(tmp_path, caplog):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, {"prompt": "x", "chosen": "y"}])
    pairs, _ = load(tmp_path, caplog, path, on_bad_rows="skip")
    assert len(pairs) == 1
    with pytest.raises(DataValidationError, match="train.jsonl:2: field 'rejected': missing"):
        setup_fit(tmp_path, path)


def test_unwritable_cache_dir_still_trains(tmp_path, caplog, demo_rows):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:5])
    (tmp_path / "cache").write_text("a file where the cache folder should be")
    pairs, status = load(tmp_path, caplog, path)
    assert len(pairs) == 5 and status.startswith("cache miss, not saved")
