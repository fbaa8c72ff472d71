"""Where data comes from: JSONL, JSON, Parquet and CSV files, lists and globs, and Hub dataset names."""

import csv
import json
import time

import pytest

from prefmodule.data.formats import DataValidationError
from prefmodule.data.sources import HubSource, find_sources

from test_data import GOOD, pairs_of, setup_fit
from conftest import write_jsonl


def write_json(path, rows):
    path.write_text(json.dumps(rows, indent=2))
    return str(path)


def write_json_lines(path, rows):  # JSON Lines saved under .json, as `Dataset.to_json` does
    return write_jsonl(path, rows)


def write_parquet(path, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)
    return str(path)


def write_csv(path, rows):
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return str(path)


@pytest.mark.parametrize("suffix, write", [(".json", write_json), (".json", write_json_lines),
                                           (".parquet", write_parquet), (".csv", write_csv)])
def test_every_file_type_reads_like_jsonl(tmp_path, demo_rows, suffix, write):
    rows = [{**r, "prompt": r["prompt"] + "\nOn two lines, with a comma."} for r in demo_rows[:6]]
    expected = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "rows.jsonl", rows)))
    assert pairs_of(setup_fit(tmp_path, write(tmp_path / f"rows{suffix}", rows))) == expected


def test_conversational_parquet_as_hub_datasets_ship_it(tmp_path):
    from prefmodule.paths import resolve
    from conftest import read_jsonl

    rows = read_jsonl(resolve("asset://demo/conversational.jsonl"))[:5]
    expected = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "chat.jsonl", rows)))
    assert pairs_of(setup_fit(tmp_path, write_parquet(tmp_path / "chat.parquet", rows))) == expected


def test_bad_rows_are_named_by_csv_line_and_by_row_in_tables(tmp_path):
    rows = [GOOD, {**GOOD, "prompt": "two\nlines"}, {**GOOD, "chosen": ""}]
    path = write_csv(tmp_path / "rows.csv", rows)
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert f"{path}:5: field 'chosen': empty response" in message  # header, row, a two-line row, then this
    for suffix, write in ((".parquet", write_parquet), (".json", write_json_lines)):
        table = write(tmp_path / f"rows{suffix}", [GOOD, {**GOOD, "rejected": None}])
        message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, table).value)
        assert f"{table}[row 1]: field 'rejected': expected a string (standard format), got null" in message


def test_globs_and_lists_read_in_order_with_row_numbers_across_files(tmp_path, demo_rows):
    first = write_jsonl(tmp_path / "part-0.jsonl", demo_rows[:3])
    second = write_jsonl(tmp_path / "part-1.jsonl", demo_rows[3:5])
    together = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "all.jsonl", demo_rows[:5])))
    assert pairs_of(setup_fit(tmp_path, str(tmp_path / "part-*.jsonl"))) == together
    swapped = pairs_of(setup_fit(tmp_path, [second, first]))
    assert [p["index"] for p in swapped] == list(range(5))
    assert [p["prompt_ids"] for p in swapped] == [p["prompt_ids"] for p in together[3:] + together[:3]]


def test_bad_names_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: 'missing.jsonl'"):
        find_sources("missing.jsonl", "train")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        find_sources(str(tmp_path / "*.parquet"), "train")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        find_sources(str(tmp_path / "notes.txt"), "train")
    with pytest.raises(ValueError, match="unknown option\\(s\\) \\['splt'\\]"):
        find_sources("owner/name?splt=test", "train")


def test_hub_names_carry_split_subset_and_revision():
    assert find_sources("HuggingFaceH4/ultrafeedback_binarized?split=test_prefs", "test") == [
        HubSource("HuggingFaceH4/ultrafeedback_binarized", "test_prefs")]
    assert find_sources(["owner/name?subset=helpful&revision=abc"], "train") == [
        HubSource("owner/name", "train", "helpful", "abc")]
    assert find_sources("owner/name", "test") == [HubSource("owner/name", "test")]


def test_dataset_folder_loads_through_datasets_with_its_split(tmp_path, demo_rows):
    """A local copy of a Hub dataset (as ``git clone`` or ``snapshot_download`` leaves it) goes through
    ``datasets.load_dataset`` like a Hub name, offline."""
    folder = tmp_path / "hub-copy" / "data"
    folder.mkdir(parents=True)
    write_parquet(folder / "train-00000-of-00001.parquet", demo_rows[:6])
    write_parquet(folder / "test-00000-of-00001.parquet", demo_rows[6:9] + [{**GOOD, "chosen": GOOD["rejected"]}])
    expected = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "rows.jsonl", demo_rows[:6])))
    assert pairs_of(setup_fit(tmp_path, str(tmp_path / "hub-copy"))) == expected
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, f"{tmp_path / 'hub-copy'}?split=test").value)
    assert f"{tmp_path / 'hub-copy'}:test[row 3]: field 'rejected': identical to chosen" in message


def test_hub_dataset_offline_fails_at_once_with_how_to_pass_a_file(tmp_path, monkeypatch):
    import datasets
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 sets them at import
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(ConnectionError) as caught:
        setup_fit(tmp_path, "trl-lib/ultrafeedback_binarized")
    assert time.perf_counter() - start < 20
    message = str(caught.value)
    assert "'trl-lib/ultrafeedback_binarized' (split 'train')" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "data.train: path/to/train.jsonl" in message


def test_hub_unreachable_fails_without_retrying(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot be reached from this machine. Pass local files instead"):
        setup_fit(tmp_path, "owner/name?split=train")
    assert time.perf_counter() - start < 10
