"""The shapes people bring from LLaMA-Factory, axolotl and UltraFeedback: ShareGPT, Alpaca, tools, ratings."""

import json
import logging

import pytest

from prefmodule.data.formats import DataValidationError
from prefmodule.data.llamafactory import alpaca_text
from prefmodule.models.loading import load_tokenizer

from conftest import TINY_MODEL, write_jsonl
from test_data import GOOD_CHAT, assert_same_ids, pairs_of, setup_fit, summary, trl_prepare

SYSTEM = "You are terse."
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "Weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
# A template that shows what it is given: tools, tool calls and tool results.
TOOL_TEMPLATE = ("{% if tools %}[tools]{{ tools | tojson }}\n{% endif %}{% for m in messages %}[{{ m['role'] }}]"
                 "{% if m.get('tool_calls') %}{{ m['tool_calls'] | tojson }}{% else %}{{ m['content'] }}{% endif %}\n"
                 "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(TINY_MODEL)


def sharegpt(turns, chosen, rejected, **extra):
    return {"conversations": [{"from": f, "value": v} for f, v in turns], "chosen": {"from": "gpt", "value": chosen},
            "rejected": {"from": "gpt", "value": rejected}, **extra}


def format_line(caplog) -> str:
    return next(line for line in summary(caplog).splitlines() if "rows read" in line)


# ----- ShareGPT ------------------------------------------------------------------------------------------------
def test_llama_factory_sharegpt_demo_rows_load_as_conversations(tmp_path, caplog, tokenizer):
    """LLaMA-Factory's DPO demo shape: conversations of from/value turns, chosen/rejected one turn each."""
    rows = [sharegpt([("human", "Hi?")], "Hello!", "Go away."),
            sharegpt([("system", SYSTEM), ("human", "Hi?"), ("gpt", "Hello."), ("human", "Again?")], "Sure.", "No."),
            sharegpt([("human", "Hi?")], "Hello!", "Go away.", system=SYSTEM)]
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, write_jsonl(tmp_path / "dpo_en_demo.jsonl", rows))
    assert "(sharegpt format): 3 rows read, 3 pairs kept; tokens per pair" in format_line(caplog)
    conversational = [GOOD_CHAT,
                      {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi?"},
                                  {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}],
                       "chosen": [{"role": "assistant", "content": "Sure."}],
                       "rejected": [{"role": "assistant", "content": "No."}]},
                      {**GOOD_CHAT, "prompt": [{"role": "system", "content": SYSTEM}, *GOOD_CHAT["prompt"]]}]
    assert_same_ids(pairs_of(data), trl_prepare(tokenizer, conversational))
    assert tokenizer.decode(pairs_of(data)[1]["prompt_ids"]).count("<|im_start|>") == 5  # every turn kept


def test_sharegpt_variants_forced_and_mapped(tmp_path, tokenizer):
    expected = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT])))
    openai_style = {"messages": GOOD_CHAT["prompt"], "chosen": GOOD_CHAT["chosen"][0],
                    "rejected": GOOD_CHAT["rejected"]}  # LLaMA-Factory's OpenAI-style ShareGPT; lists allowed
    assert pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "openai.jsonl", [openai_style]))) == expected
    renamed = {"dialog": [{"speaker": "me", "text": "Hi?"}], "good": {"speaker": "bot", "text": "Hello!"},
               "bad": [{"speaker": "bot", "text": "Go away."}]}
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "renamed.jsonl", [renamed]), format="sharegpt",
                     columns={"dialog": "conversations", "good": "chosen", "bad": "rejected"},
                     tags={"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot"})
    assert pairs_of(data) == expected


def test_sharegpt_errors_name_the_turn(tmp_path):
    rows = [sharegpt([("human", "Hi?")], "Hello!", "Go away."),
            sharegpt([("customer", "Hi?")], "Hello!", "Go away."),
            {**sharegpt([("human", "Hi?")], "Hello!", "Go away."), "chosen": {"from": "human", "value": "Hello!"}},
            sharegpt([("human", "Hi?"), ("gpt", "Hello.")], "Again.", "No."),
            sharegpt([("human", "Hi?"), ("function_call", "weather(Paris)")], "Sunny.", "Rain."),
            {"conversations": [{"from": "human"}], "chosen": {"from": "gpt", "value": "a"},
             "rejected": {"from": "gpt", "value": "b"}}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert f"{path}:2: field 'conversations': message 0: unknown role 'customer'; expected one of" in message
    assert f"{path}:3: field 'chosen': expected the assistant's turn ('gpt' or 'function_call'), got user" in message
    assert f"{path}:4: field 'conversations': the last turn is answered by chosen/rejected" in message
    assert f"{path}:5: field 'conversations': message 1: a function call should be JSON" in message
    assert f"{path}:6: field 'conversations': message 0: expected an object with 'from' and 'value'" in message


# ----- tools ----------------------------------------------------------------------------------------------------
def test_tools_reach_the_chat_template_and_tool_turns_are_kept_as_trl(tmp_path, tokenizer):
    call = {"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}
    prompt = [{"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
              {"role": "tool", "content": "sunny, 21C"}]
    rows = [{"prompt": prompt, "chosen": [{"role": "assistant", "content": "Sunny."}],
             "rejected": [{"role": "assistant", "content": "No idea."}], "tools": json.dumps(TOOLS)}] * 2
    data = setup_fit(tmp_path, write_jsonl(tmp_path / "tools.jsonl", rows), chat_template=TOOL_TEMPLATE)
    pair = pairs_of(data)[0]
    text = tokenizer.decode(pair["prompt_ids"])
    assert text.startswith('[tools][{"type": "function", "function": {"name": "weather"')
    assert '[assistant][{"type": "function", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]' in text
    assert text.endswith("[tool]sunny, 21C[assistant]")
    templated = load_tokenizer(TINY_MODEL)
    templated.chat_template = TOOL_TEMPLATE
    assert_same_ids(pairs_of(data), trl_prepare(templated, rows))
    turns = sharegpt([("human", "Weather in Paris?"), ("function_call", json.dumps({"name": "weather", "arguments":
                                                                                   {"city": "Paris"}})),
                      ("observation", "sunny, 21C")], "Sunny.", "No idea.", tools=json.dumps(TOOLS))
    from_sharegpt = setup_fit(tmp_path, write_jsonl(tmp_path / "turns.jsonl", [turns]), chat_template=TOOL_TEMPLATE)
    assert pairs_of(from_sharegpt)[0] == pair


# ----- Alpaca ---------------------------------------------------------------------------------------------------
def test_alpaca_rows_use_the_chat_template_and_keep_the_instruction(tmp_path, caplog, tokenizer):
    rows = [{"instruction": "Translate to French.", "input": "Good morning", "chosen": "Bonjour", "rejected": "Hola"},
            {"instruction": "Name a colour.", "output": ["Blue.", "Seven."], "system": SYSTEM,
             "history": [["Hi", "Hello"]]}]
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, write_jsonl(tmp_path / "alpaca.jsonl", rows))
    assert "(alpaca format): 2 rows read, 2 pairs kept" in format_line(caplog)
    conversational = [
        {"prompt": [{"role": "user", "content": "Translate to French.\nGood morning"}],
         "chosen": [{"role": "assistant", "content": "Bonjour"}], "rejected": [{"role": "assistant", "content": "Hola"}]},
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Name a colour."}],
         "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Seven."}]}]
    assert_same_ids(pairs_of(data), trl_prepare(tokenizer, conversational))


def test_alpaca_without_a_chat_template_is_laid_out_as_text(tmp_path, caplog):
    plain = load_tokenizer(TINY_MODEL)
    plain.chat_template = None
    row = {"instruction": "Translate.", "input": "Good morning", "system": SYSTEM, "history": [["Hi", "Hello"]],
           "chosen": "Bonjour", "rejected": "Hola"}
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, write_jsonl(tmp_path / "alpaca.jsonl", [row]), tokenizer=plain)
    assert "(alpaca (text layout: the tokenizer has no chat template) format)" in format_line(caplog)
    pair = pairs_of(data)[0]
    prompt = ("You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello\n\n### Instruction:\nTranslate.\n\n"
              "### Input:\nGood morning\n\n### Response:\n")
    assert alpaca_text(SYSTEM, [["Hi", "Hello"]], "Translate.", "Good morning") == prompt
    assert plain.decode(pair["prompt_ids"]) == "<s>" + prompt
    assert plain.decode(pair["chosen_ids"]) == "Bonjour</s>"


def test_alpaca_errors_and_never_implicit(tmp_path):
    rows = [{"instruction": "a", "chosen": "x", "rejected": "y"},
            {"instruction": "a", "output": ["x"]},
            {"instruction": "a", "history": [["only one"]], "chosen": "x", "rejected": "y"},
            {"instruction": " ", "chosen": "x", "rejected": "y"},
            {"instruction": "a", "chosen": "x"}]
    path = write_jsonl(tmp_path / "alpaca.jsonl", rows)
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert f"{path}:2: field 'output': expected [chosen, rejected], two strings" in message
    assert f"{path}:3: field 'history': expected a list of [user, assistant] string pairs" in message
    assert f"{path}:4: field 'instruction': empty instruction" in message
    assert f"{path}:5: field 'rejected': missing" in message


# ----- ratings -------------------------------------------------------------------------------------------------
def ultrafeedback(prompt, scores, key="fine-grained_score"):
    return {"source": "demo", "instruction": prompt, "models": ["m"] * len(scores),
            "completions": [{"model": "m", "response": f"answer {i} to {prompt}", key: s, "overall_score": -s}
                            for i, s in enumerate(scores)]}


def test_ultrafeedback_ratings_become_pairs_with_their_scores(tmp_path, caplog, tokenizer):
    rows = [ultrafeedback("Q1?", [3.0, 4.5, 2.0, 4.5]), ultrafeedback("Q2?", [2.0, 2.0]),
            ultrafeedback("Q3?", [1.0, 5.0])]
    path = write_jsonl(tmp_path / "uf.jsonl", rows)
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, path)
    assert ("(ratings, fine-grained_score, best_worst format): 3 rows read, 2 pairs kept, 1 dropped (1 tied ratings)"
            in format_line(caplog))
    first, third = pairs_of(data)
    assert (first["index"], first["score_chosen"], first["score_rejected"]) == (0, 4.5, 2.0)
    assert tokenizer.decode(first["chosen_ids"]) == "answer 1 to Q1?</s>"  # the first of the tied best
    assert tokenizer.decode(first["rejected_ids"]) == "answer 2 to Q1?</s>"
    assert (third["index"], third["score_chosen"], third["score_rejected"]) == (2, 5.0, 1.0)
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch.score_chosen.tolist()) == [4.5, 5.0] and batch.score_rejected.dtype.is_floating_point
    by_overall = pairs_of(setup_fit(tmp_path, path, columns={"overall_score": "score"}))
    assert (by_overall[0]["score_chosen"], by_overall[0]["score_rejected"]) == (-2.0, -4.5)


def test_best_random_is_seeded_by_content_and_strictly_lower(tmp_path, tokenizer):
    rows = [ultrafeedback(f"Q{i}?", [5.0, 4.0, 3.0, 2.0, 1.0, 5.0]) for i in range(30)]
    draws = {}
    for name, order in (("a", rows), ("b", rows[::-1])):
        pairs = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / f"{name}.jsonl", order),
                                   pairs_from_ratings="best_random", seed=7))
        draws[name] = {tokenizer.decode(p["chosen_ids"]): (tokenizer.decode(p["rejected_ids"]), p["score_rejected"])
                       for p in pairs}
    assert draws["a"] == draws["b"]  # the same draw whatever the row order
    assert all(score < 5.0 for _, score in draws["a"].values())
    assert len({score for _, score in draws["a"].values()}) > 2  # not always the worst
    other_seed = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "a.jsonl", rows),
                                    pairs_from_ratings="best_random", seed=8))
    assert [p["score_rejected"] for p in other_seed] != [s for _, s in draws["a"].values()]


def test_parallel_score_lists_and_bad_ratings(tmp_path):
    rows = [{"prompt": "Q?", "completions": ["good", "bad", "meh"], "scores": [9, 1, 5]},
            {"prompt": "Q?", "completions": ["good", "bad"], "scores": [9]},
            {"prompt": "Q?", "completions": ["good", "bad"], "scores": [9, "N/A"]},
            {"prompt": "Q?", "completions": ["only"], "scores": [1]}]
    path = write_jsonl(tmp_path / "rated.jsonl", rows)
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path).value)
    assert f"{path}:2: field 'scores': expected a list of 2 scores, one per completion" in message
    assert f"{path}:3: field 'scores[1]': expected a finite number, got 'N/A'" in message
    assert f"{path}:4: field 'completions': needs at least 2 rated completions, got 1" in message
    pair = pairs_of(setup_fit(tmp_path, path, on_bad_rows="skip"))[0]
    assert (pair["score_chosen"], pair["score_rejected"]) == (9.0, 1.0)


def test_binarized_rows_keep_their_score_columns(tmp_path):
    rows = [{"prompt": "Q?", "chosen": "yes", "rejected": "no", "score_chosen": 8.0, "score_rejected": 3.5},
            {"prompt": "R?", "chosen": "yes", "rejected": "no"}]
    pairs = pairs_of(setup_fit(tmp_path, write_jsonl(tmp_path / "binarized.jsonl", rows)))
    assert (pairs[0]["score_chosen"], pairs[0]["score_rejected"]) == (8.0, 3.5)
    assert pairs[1]["score_chosen"] != pairs[1]["score_chosen"]  # NaN: this row has no scores


def test_a_row_the_chat_template_refuses_is_named(tmp_path, caplog):
    strict = ("{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
              "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant') }}{% endif %}"
              "[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    rows = [GOOD_CHAT, sharegpt([("gpt", "Hello."), ("human", "Hi?")], "Sure.", "No."), GOOD_CHAT]
    rows[0] = {"conversations": [{"from": "human", "value": "Hi?"}], "chosen": {"from": "gpt", "value": "Hello!"},
               "rejected": {"from": "gpt", "value": "Go away."}}
    rows[2] = rows[0]
    path = write_jsonl(tmp_path / "turns.jsonl", rows)
    message = str(pytest.raises(DataValidationError, setup_fit, tmp_path, path, chat_template=strict).value)
    assert (f"{path}:2: the chat template cannot render this row: Conversation roles must alternate "
            "user/assistant/user/assistant") in message
    with caplog.at_level(logging.INFO):
        data = setup_fit(tmp_path, path, chat_template=strict, on_bad_rows="skip")
    assert [p["index"] for p in pairs_of(data)] == [0, 2]
    assert "3 rows read, 2 pairs kept, 1 dropped (1 chat template failed)" in format_line(caplog)
