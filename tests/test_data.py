"""Reading, validating and tokenising preference pairs: formats, bad rows, TRL parity, truncation."""

import json
import logging
from types import SimpleNamespace

import pytest

from prefmodule.data.datamodule import PreferenceDataModule, split_positions
from prefmodule.data.formats import DataValidationError, extract_prompt
from prefmodule.data.tokenize import tokenize_pair, tokenize_pairs
from prefmodule.errors import ConfigError
from prefmodule.models.loading import load_tokenizer

from conftest import TINY_MODEL, read_jsonl, write_jsonl

GOOD = {"prompt": "Hi?", "chosen": "Hello, how can I help?", "rejected": "Go away."}
USER = [{"role": "user", "content": "Hi?"}]
GOOD_CHAT = {"prompt": USER, "chosen": [{"role": "assistant", "content": "Hello!"}],
             "rejected": [{"role": "assistant", "content": "Go away."}]}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_MODEL)


@pytest.fixture(scope="module")
def chat_rows():
    from prefmodule.paths import resolve

    return read_jsonl(resolve("asset://demo/conversational.jsonl"))


def setup_fit(tmp_path, train, **kwargs):
    kwargs = {"tokenizer": TINY_MODEL, "cache_dir": str(tmp_path / "cache"), **kwargs}
    data = PreferenceDataModule(train=train, **kwargs)
    data.setup("fit")
    return data


def summary(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.getMessage().startswith("prefmodule data"))


# ----- validation ------------------------------------------------------------------------------------
def test_every_bad_row_is_named_with_file_line_and_field(tmp_path, caplog):
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
        setup_fit(tmp_path, path)
    message = str(caught.value)
    assert "5 of 7 rows are malformed" in message
    assert f"{path}:2: invalid JSON" in message
    assert f"{path}:3: field 'rejected': missing" in message
    assert f"{path}:4: field 'chosen': expected a string (standard format), got int" in message
    assert f"{path}:5: field 'chosen': empty response" in message
    assert f"{path}:6: field 'rejected': identical to chosen" in message
    assert "on_bad_rows: skip" in message
    assert not list((tmp_path / "cache").iterdir())  # nothing cached, not even a partial entry

    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, path, on_bad_rows="skip")
    assert [data.datasets["train"][i]["index"] for i in range(2)] == [0, 6]  # row numbers in the file
    report = summary(caplog)
    assert "7 rows read, 2 pairs kept, 5 dropped (" in report
    for reason in ("1 invalid JSON", "1 missing field", "1 wrong type", "1 empty response", "1 identical responses"):
        assert reason in report
    assert f"skipped 5 bad rows of train:\n  {path}:2: invalid JSON" in report


def test_error_lists_first_twenty_and_the_count(tmp_path):
    path = write_jsonl(tmp_path / "many.jsonl", [{"prompt": "x", "chosen": "y"}] * 30)  # no rejected: all malformed
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert "30 of 30 rows" in message and "... and 10 more" in message
    assert f"{path}:20:" in message and f"{path}:21:" not in message


@pytest.mark.parametrize("row, where, expected", [
    ({"prompt": "Hi?", "chosen": GOOD_CHAT["chosen"], "rejected": GOOD_CHAT["rejected"]}, "prompt",
     "expected a list of {role, content} messages (conversational format), got str"),
    ({**GOOD_CHAT, "chosen": [{"role": "assistant"}]}, "chosen",
     "message 0: expected an object with 'role' and 'content'"),
    ({**GOOD_CHAT, "rejected": [{"role": "assistant", "content": None}]}, "rejected",
     "message 0: 'content' should be a string, got null"),
    ({**GOOD_CHAT, "chosen": []}, "chosen", "empty response"),
    ({**GOOD_CHAT, "chosen": [{"role": "assistant", "content": " "}]}, "chosen", "empty response"),
    ({**GOOD_CHAT, "prompt": []}, "prompt", "no prompt messages"),
    ({**GOOD_CHAT, "rejected": GOOD_CHAT["chosen"]}, "rejected", "identical to chosen"),
    (["not", "an", "object"], None, "expected an object with fields ['prompt', 'chosen', 'rejected'], got list"),
])
def test_bad_conversational_rows(tmp_path, row, where, expected):
    path = write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT, row])
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert (f"{path}:2: field {where!r}: {expected}" if where else f"{path}:2: {expected}") in message


@pytest.mark.parametrize("row, expected", [
    ({"chosen": [*USER, {"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "?"}]},
     "field 'chosen': chosen and rejected share no leading message, so there is no prompt"),
    ({"chosen": [*USER, {"role": "assistant", "content": "a"}], "rejected": [*USER]},
     "field 'rejected': empty response"),
])
def test_bad_implicit_rows(tmp_path, row, expected):
    first = {"chosen": [*USER, {"role": "assistant", "content": "a"}], "rejected": [*USER, {"role": "assistant",
                                                                                           "content": "b"}]}
    path = write_jsonl(tmp_path / "implicit.jsonl", [first, row])
    assert f"{path}:2: {expected}" in str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)


def test_bad_data_fails_before_training(tmp_path, capsys):
    from prefmodule.cli import main

    bad = write_jsonl(tmp_path / "bad.jsonl", [GOOD, {"prompt": "x", "chosen": "y"}])
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--model=prefmodule.ORPOModule", f"--model.model={TINY_MODEL}", f"--data.train={bad}",
              f"--data.cache_dir={tmp_path / 'cache'}", f"--trainer.default_root_dir={tmp_path}",
              "--trainer.max_steps=1"])
    assert exit.value.code == 2
    assert "bad.jsonl:2: field 'rejected': missing" in capsys.readouterr().err


# ----- formats -----------------------------------------------------------------------------------------
def trl_prepare(tokenizer, rows, max_length=None):
    trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")
    from datasets import Dataset

    args = SimpleNamespace(dataset_num_proc=None, max_length=max_length, truncation_mode="keep_start")
    stand_in = SimpleNamespace(_tokenizer=tokenizer)
    return list(trl_dpo.DPOTrainer._prepare_dataset(stand_in, Dataset.from_list(rows), tokenizer, args, "train"))


def assert_same_ids(ours, theirs):
    assert len(ours) == len(theirs)
    for mine, trl in zip(ours, theirs):
        for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
            assert mine[key] == trl[key], key


def pairs_of(data, split="train"):
    return [data.datasets[split][i] for i in range(len(data.datasets[split]))]


def test_tokenisation_matches_trl(tokenizer, demo_rows):
    """Same ids as TRL's DPOTrainer tokenisation of the standard format (BOS from the tokenizer, EOS added)."""
    rows = demo_rows[:8]
    ours = [tokenize_pair(tokenizer, r["prompt"], r["chosen"], r["rejected"]) for r in rows]
    assert_same_ids(ours, trl_prepare(tokenizer, rows))
    assert all(p["prompt_ids"][0] == tokenizer.bos_token_id for p in ours)
    assert all(p["chosen_ids"][-1] == tokenizer.eos_token_id for p in ours)


@pytest.mark.parametrize("shape", ["conversational", "implicit messages", "implicit text"])
def test_other_formats_match_trl(tmp_path, tokenizer, chat_rows, shape):
    """Conversational rows (system messages included) and implicit prompts, read from a file by the datamodule."""
    rows = chat_rows[:12]
    if shape == "implicit messages":
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    elif shape == "implicit text":
        rows = [{"chosen": f"{r['prompt'][-1]['content']} {r['chosen'][0]['content']}",
                 "rejected": f"{r['prompt'][-1]['content']} {r['rejected'][0]['content']}"} for r in rows]
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "rows.jsonl", rows))
    ours = pairs_of(data)
    assert_same_ids(ours, trl_prepare(tokenizer, rows))
    assert [p["index"] for p in ours] == list(range(12))
    if shape == "conversational":
        with_system = next(i for i, r in enumerate(rows) if r["prompt"][0]["role"] == "system")
        prompt = tokenizer.decode(ours[with_system]["prompt_ids"])
        assert prompt.startswith(f"<|im_start|>system\n{rows[with_system]['prompt'][0]['content']}<|im_end|>")
        assert prompt.endswith("<|im_start|>assistant\n")  # the generation prompt


def test_auto_detects_implicit_messages_under_a_text_prompt(tmp_path, tokenizer, chat_rows):
    """UltraFeedback-binarized style: a text ``prompt`` column next to whole dialogues (TRL's ``maybe_extract_prompt``)."""
    implicit = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in chat_rows[:4]]
    rows = [{"prompt": r["prompt"][-1]["content"], **i} for r, i in zip(chat_rows, implicit)]
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "uf.jsonl", rows))
    assert_same_ids(pairs_of(data), trl_prepare(tokenizer, implicit))
    with pytest.raises(DataValidationError, match="uf.jsonl:1: field 'chosen': expected a string"):
        setup_fit(tmp_path, write_jsonl(tmp_path / "uf.jsonl", rows), format="standard")


def test_format_is_detected_from_the_dataset_not_from_a_broken_first_row(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [{"chosen": "a", "rejected": "b"}, GOOD, GOOD])
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert message.startswith("1 of 3 rows are malformed") and f"{path}:1: field 'prompt': missing" in message


def test_conversational_data_without_a_chat_template_says_how_to_give_one(tmp_path):
    tokenizer = load_tokenizer(TINY_MODEL)
    tokenizer.chat_template = None
    with pytest.raises(ConfigError, match="conversational data needs a chat template .* set `data.chat_template`"):
        setup_fit(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT]), tokenizer=tokenizer)


def test_forced_format_checks_every_row_against_it(tmp_path):
    path = write_jsonl(tmp_path / "text.jsonl", [GOOD, GOOD])
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path, format="conversational").value)
    assert f"{path}:1: field 'prompt': expected a list of {{role, content}} messages (conversational format)" in message


def test_hh_dialogues_split_at_the_last_assistant_turn(tmp_path):
    dialogue = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: Recommend a book?\n\nAssistant:"
    row = {"chosen": dialogue + " Try Dune.", "rejected": dialogue + " Try nothing."}
    assert extract_prompt(row["chosen"], row["rejected"]) == (dialogue, " Try Dune.", " Try nothing.")
    # a plain common prefix would have cut inside the answer
    assert extract_prompt("Q: x\nA: Try Dune.", "Q: x\nA: Try nothing.") == ("Q: x\nA: Try", " Dune.", " nothing.")
    moved = {"chosen": "\n\nHuman: Hi\n\nAssistant: a" + dialogue + " b", "rejected": dialogue + " c"}
    path = write_jsonl(tmp_path / "hh.jsonl", [row, moved])
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert f"{path}:2: field 'chosen': chosen and rejected differ before their last" in message
    data = setup_fit(tmp_path, path, on_bad_rows="skip")
    assert len(data.datasets["train"]) == 1


def test_columns_are_mapped_and_errors_name_the_datasets_own_column(tmp_path, tokenizer):
    rows = [{"question": GOOD["prompt"], "good": GOOD["chosen"], "bad": GOOD["rejected"]}] * 2
    columns = {"question": "prompt", "good": "chosen", "bad": "rejected"}
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "mapped.jsonl", rows), columns=columns)
    assert pairs_of(data)[0] == {"index": 0, **tokenize_pair(tokenizer, GOOD["prompt"], GOOD["chosen"], GOOD["rejected"])}
    broken = write_jsonl(tmp_path / "broken.jsonl", [rows[0], {"question": "x", "good": "y"}])
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, broken, columns=columns).value)
    assert f"{broken}:2: field 'bad': missing" in message


def test_chat_template_from_yaml_replaces_the_tokenizers(tmp_path, tokenizer):
    template = ("{% for m in messages %}[{{ m['role'] }}]\n{{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT]), chat_template=template)
    pair = pairs_of(data)[0]
    assert tokenizer.decode(pair["prompt_ids"]) == "[user]\nHi?\n[assistant]\n"
    assert tokenizer.decode(pair["chosen_ids"]) == "Hello!\n"
    template_file = tmp_path / "template.jinja"
    template_file.write_text(template)
    from_file = setup_fit(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT]), chat_template=str(template_file))
    assert pairs_of(from_file) == [pair]


# ----- truncation -----------------------------------------------------------------------------------------
def test_eos_not_doubled_and_responses_cut_at_the_end(tokenizer):
    with_eos = tokenize_pair(tokenizer, "Q?", "yes" + tokenizer.eos_token, "no")
    assert with_eos["chosen_ids"].count(tokenizer.eos_token_id) == 1
    full = tokenize_pair(tokenizer, "Tell me a story", "Once upon a time there was a tiny model.", "No.")
    cut = tokenize_pair(tokenizer, "Tell me a story", "Once upon a time there was a tiny model.", "No.",
                        max_length=len(full["prompt_ids"]) + 3)
    assert cut["chosen_ids"] == full["chosen_ids"][:3]
    assert cut["rejected_ids"] == full["rejected_ids"][:3]


def test_prompt_truncation_keeps_the_end_with_bos_or_the_start(tokenizer):
    prompt = "One two three four five six seven eight nine ten eleven twelve?"
    full = tokenize_pair(tokenizer, prompt, "Yes.", "No.")["prompt_ids"]
    end = tokenize_pair(tokenizer, prompt, "Yes.", "No.", max_prompt_length=5)
    assert end["prompt_ids"] == [tokenizer.bos_token_id] + full[-4:]
    start = tokenize_pair(tokenizer, prompt, "Yes.", "No.", max_prompt_length=5, truncation_mode="keep_start")
    assert start["prompt_ids"] == full[:5]
    assert end["chosen_ids"] == start["chosen_ids"] == tokenize_pair(tokenizer, prompt, "Yes.", "No.")["chosen_ids"]


def test_prompt_longer_than_max_length_is_dropped_and_counted_unless_cut(tmp_path, tokenizer, caplog):
    long_prompt = " ".join(["word"] * 80)
    rows = [GOOD, {"prompt": long_prompt, "chosen": "a", "rejected": "b"}, GOOD]
    prompt_tokens = len(tokenizer(long_prompt)["input_ids"])
    assert prompt_tokens > 32
    path = write_jsonl(tmp_path / "long.jsonl", rows)
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, path, max_length=32)
    assert [p["index"] for p in pairs_of(data)] == [0, 2]
    assert "3 rows read, 2 pairs kept, 1 dropped (1 prompt fills max_length)" in summary(caplog)
    kept = setup_fit(tmp_path, path, max_length=32, max_prompt_length=30)
    long = pairs_of(kept)[1]
    assert len(long["prompt_ids"]) == 30 and len(long["prompt_ids"]) + len(long["chosen_ids"]) <= 32
    # TRL drops the same pair (its prompt fills max_length) and cuts the rest to the same ids
    assert_same_ids(pairs_of(data), trl_prepare(tokenizer, rows, max_length=32))


def test_response_cut_to_nothing_is_dropped(tokenizer):
    prompt_tokens = len(tokenize_pair(tokenizer, "Tell me a story", "a", "b")["prompt_ids"])
    assert tokenize_pair(tokenizer, "Tell me a story", "a", "b", max_length=prompt_tokens) is None
    kept = tokenize_pair(tokenizer, "Tell me a story", "a", "b", max_length=prompt_tokens + 1)
    assert len(kept["chosen_ids"]) == 1 and len(kept["rejected_ids"]) == 1
    results = list(tokenize_pairs(tokenizer, ["Tell me a story"], ["a"], ["b"], max_length=prompt_tokens))
    assert results == ["prompt fills max_length"]


# ----- splits ---------------------------------------------------------------------------------------------
def test_seeded_val_split_is_disjoint_and_repeatable():
    kept, held = split_positions(100, 0.1, seed=3)
    assert len(held) == 10 and len(kept) == 90
    assert sorted([*kept, *held]) == list(range(100))
    assert [a.tolist() for a in split_positions(100, 0.1, seed=3)] == [kept.tolist(), held.tolist()]
    assert split_positions(100, 0.1, seed=4)[1].tolist() != held.tolist()


def test_datamodule_val_fraction_and_batches(tmp_path, demo_rows):
    path = write_jsonl(tmp_path / "t.jsonl", demo_rows[:40])
    data = setup_fit(tmp_path, path, val_fraction=0.25, batch_size=5)
    train, val = data.datasets["train"], data.datasets["val"]
    assert len(train) == 30 and len(val) == 10
    indexes = {train[i]["index"] for i in range(30)} | {val[i]["index"] for i in range(10)}
    assert indexes == set(range(40))  # held-out pairs keep their row numbers
    batch = next(iter(data.train_dataloader()))
    assert batch.sequences.input_ids.shape[0] == 10
    assert (batch.sequences.labels != -100).sum() > 0
    assert (batch.sequences.attention_mask.sum(1) > 0).all()
    data.setup("validate")  # validate/test/predict reuse the held-out part
    assert [data.datasets["val"][i]["index"] for i in range(10)] == [val[i]["index"] for i in range(10)]
    with pytest.raises(ValueError, match="no test data: set `data.test` or `data.val`"):
        setup_fit(tmp_path, path).setup("test")


def test_json_rows_round_trip(tmp_path):
    """A JSON list file reads like the JSONL it came from, and names bad rows by their position."""
    rows = [GOOD, {**GOOD, "chosen": 1}]
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(rows))
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, str(path)).value)
    assert f"{path}[row 1]: field 'chosen': expected a string" in message


def test_bad_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="data.max_prompt_length \\(64\\) must be below data.max_length \\(64\\)"):
        PreferenceDataModule(max_length=64, max_prompt_length=64)
    with pytest.raises(ConfigError, match="columns must map dataset columns to distinct names"):
        PreferenceDataModule(columns={"question": "query"})
    with pytest.raises(ConfigError, match="format must be one of"):
        PreferenceDataModule(format="sharegpt4")
