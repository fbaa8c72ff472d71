"""Hostile input: bad settings, files that are not data, fuzzed rows, untrusted cache files, a full disk."""

import json
import logging
import pickle
import resource
import signal

import numpy as np
import pytest

from prefmodule.data import PreferenceDataModule
from prefmodule.data.formats import DataValidationError
from prefmodule.errors import ConfigError, DataError, MissingFileError

from conftest import TINY_MODEL, write_jsonl
from test_data import GOOD, pairs_of, setup_fit, summary


def cli(tmp_path, capsys, *args):
    """``prefmodule fit`` with ``args``: its exit code and what it printed on stderr."""
    from prefmodule.cli import main

    with pytest.raises(SystemExit) as exit:
        main(["fit", "--model=prefmodule.ORPOModule", f"--model.model={TINY_MODEL}",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=1", *args])
    return exit.value.code, capsys.readouterr().err


# ----- settings ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("setting, message", [
    ({"batch_size": 0}, "data.batch_size must be an integer >= 1, got 0"),
    ({"eval_batch_size": -2}, "data.eval_batch_size must be an integer >= 1, got -2"),
    ({"max_length": 1}, "data.max_length must be an integer >= 2 (the prompt alone takes at least one token"),
    ({"max_length": 64, "max_prompt_length": 80}, "data.max_prompt_length (80) must be below data.max_length (64)"),
    ({"val_fraction": 1.0}, "data.val_fraction must be in [0, 1), got 1.0"),
    ({"truncation_mode": "middle"}, "data.truncation_mode must be one of ['keep_end', 'keep_start'], got 'middle'"),
    ({"on_bad_rows": "ignore"}, "data.on_bad_rows must be one of ['error', 'skip'], got 'ignore'"),
    ({"pairs_from_ratings": "best"}, "data.pairs_from_ratings must be one of ['best_worst', 'best_random']"),
    ({"tags": {"speaker": "from"}}, "data.tags takes string values for ['role_tag', 'content_tag'"),
    ({"num_workers": -1}, "data.num_workers must be an integer >= 0, got -1"),
    ({"unpaired": "yes"}, "data.unpaired must be true or false, got 'yes'"),
])
def test_each_setting_is_checked_with_what_is_allowed(setting, message):
    with pytest.raises(ConfigError) as caught:
        PreferenceDataModule(**setting)
    assert message in str(caught.value)


def test_bad_settings_and_missing_files_exit_2_through_the_cli(tmp_path, capsys):
    good = write_jsonl(tmp_path / "train.jsonl", [GOOD])
    code, err = cli(tmp_path, capsys, f"--data.train={good}", "--data.batch_size=0")
    assert code == 2 and "data.batch_size must be an integer >= 1, got 0" in err and "Traceback" not in err
    code, err = cli(tmp_path, capsys, f"--data.train={good}", "--data.max_length=1")
    assert code == 2 and "data.max_length must be an integer >= 2" in err
    code, err = cli(tmp_path, capsys, f"--data.train={tmp_path / 'nowhere.jsonl'}")
    assert code == 2 and f"data file not found: '{tmp_path / 'nowhere.jsonl'}'" in err
    with pytest.raises(MissingFileError, match="data.chat_template: no such file 'missing.jinja'"):
        PreferenceDataModule(train=good, chat_template="missing.jinja")


def test_files_that_are_not_data(tmp_path, capsys):
    garbage = tmp_path / "garbage.jsonl"
    garbage.write_bytes(np.random.default_rng(0).bytes(64_000))
    code, err = cli(tmp_path, capsys, f"--data.train={garbage}", f"--data.cache_dir={tmp_path / 'cache'}")
    assert code == 2 and f"{garbage}: not a JSON Lines file: none of its" in err and "Is it the right file?" in err
    for name, content, message in (("garbage.parquet", b"PAR1 not really", "not a Parquet file"),
                                   ("garbage.json", b'\xff\xfe{"a": 1}', "not a JSON file: not UTF-8 text"),
                                   ("words.jsonl", b"just some text\nand more text\n", "not a JSON Lines file")):
        path = tmp_path / name
        path.write_bytes(content)
        with pytest.raises(DataError, match=message):
            setup_fit(tmp_path, str(path))


def test_a_validation_set_with_no_usable_pair(tmp_path, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD] * 2)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": " ".join(["word"] * 80), "chosen": "a", "rejected": "b"}])
    code, err = cli(tmp_path, capsys, f"--data.train={train}", f"--data.val={val}", "--data.max_length=32",
                    f"--data.cache_dir={tmp_path / 'cache'}")
    assert code == 2
    assert f"val: no usable row in {val} (1 read, 1 dropped (1 prompt fills max_length); max_length=32" in err


# ----- fuzzed rows ---------------------------------------------------------------------------------------------
def test_fuzzed_rows_are_each_named_and_no_good_row_is_lost(tmp_path, caplog):
    big = json.dumps({**GOOD, "notes": "x" * 10_000_000})  # a 10 MB row: valid, kept
    lines = [json.dumps(GOOD).encode(),
             np.random.default_rng(1).bytes(300).replace(b"\n", b" "),  # 2: random bytes
             b'{"prompt": "Hi?", "chosen": "Hel',  # 3: truncated JSON
             b"[" * 100_000 + b"]" * 100_000,  # 4: nested too deeply for any parser
             big.encode(),  # 5
             b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}',  # 6: Latin-1, not UTF-8
             b'{"prompt": "a\x00b", "chosen": "a", "rejected": "b"}',  # 7: a raw NUL byte inside a string
             b"\x00\x00\x00",  # 8: NUL bytes
             json.dumps({"prompt": "a\u0000b", "chosen": "ok", "rejected": "no"}).encode(),  # 9: an escaped NUL: fine
             json.dumps({**GOOD, "prompt": "x" * 200_000}).encode(),  # 10: a long prompt, dropped by max_length
             b'{"prompt": "\\ud800", "chosen": "a", "rejected": "b"}']  # 11: an escaped lone surrogate
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, str(path)).value)
    assert message.startswith("7 of 11 rows are malformed")
    for line, reason in ((2, "not UTF-8 text"), (3, "invalid JSON (Unterminated string starting at: column 29)"), (4, "invalid JSON (nested too deeply)"),
                         (6, "not UTF-8 text (byte 0xe9 at column 16)"), (7, "invalid JSON (Invalid control character"),
                         (8, "invalid JSON"), (11, "not UTF-8 text (an escaped lone surrogate")):
        assert f"{path}:{line}: {reason}" in message
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, str(path), on_bad_rows="skip")
    assert [p["index"] for p in pairs_of(data)] == [0, 4, 8]  # lines 1, 5, 9
    assert "11 rows read, 3 pairs kept, 8 dropped" in summary(caplog)


# ----- untrusted cache files ----------------------------------------------------------------------------------
class Payload:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_planted_in_the_cache_is_never_run(tmp_path, demo_rows):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:5])
    expected = pairs_of(setup_fit(tmp_path, path))
    entry = next(p for p in (tmp_path / "cache").iterdir())
    marker = tmp_path / "pwned"
    np.save(entry / "index.npy", np.array([Payload(str(marker))], dtype=object), allow_pickle=True)
    assert pickle.loads(pickle.dumps(Payload(str(tmp_path / "check")))) and (tmp_path / "check").exists()  # it would
    with pytest.warns(UserWarning, match="unreadable: Array can't be memory-mapped: Python objects in dtype"):
        again = pairs_of(setup_fit(tmp_path, path))
    assert not marker.exists() and again == expected


# ----- a full disk -------------------------------------------------------------------------------------------
def test_a_full_disk_while_caching_trains_from_memory_and_says_where(tmp_path, demo_rows):
    """No file may grow past 16 KiB (as a disk that fills up mid-write): the cache entry fails part-way, the
    message names the cache folder, and the data is tokenised into memory instead."""
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:400])
    limits, handler = resource.getrlimit(resource.RLIMIT_FSIZE), signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024, limits[1]))
    try:
        with pytest.warns(UserWarning) as warned:
            data = setup_fit(tmp_path, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
        signal.signal(signal.SIGXFSZ, handler)
    assert len(data.datasets["train"]) == 400 and data.datasets["train"][399]["index"] == 399
    message = str(warned[0].message)
    assert f"cannot write the data cache at {tmp_path / 'cache'}: File too large" in message
    assert "into memory for this run" in message
    assert list((tmp_path / "cache").iterdir()) == []  # no partial entry left behind
    assert pairs_of(data) == pairs_of(setup_fit(tmp_path, path))  # the same pairs as a cached run


def test_tokenising_shows_progress_and_its_duration(tmp_path, caplog, capsys, demo_rows):
    path = write_jsonl(tmp_path / "train.jsonl", demo_rows[:50])
    with caplog.at_level(logging.INFO):
        setup_fit(tmp_path, path)
    assert f"tokenising {path}" in capsys.readouterr().err  # the bar, with its rate and ETA
    assert any(r.getMessage().startswith(f"prefmodule: tokenising {path}: done in ") for r in caplog.records)
