"""LLaMA-Factory's (and axolotl's) two dataset shapes, ShareGPT and Alpaca, read as preference pairs.

- ``sharegpt``: ``conversations`` (or ``messages``) of ``{"from": "human"|"gpt"|"system"|"function_call"|
  "observation", "value": ...}`` turns, ``chosen``/``rejected`` one such turn or a list, optional ``system``
  and ``tools`` columns. Turns in ``{"role", "content"}`` form (LLaMA-Factory's OpenAI style) are read too;
  other key and role names map with ``tags`` (LLaMA-Factory's ``role_tag``, ``content_tag``, ``user_tag``,
  ``assistant_tag``, ``observation_tag``, ``function_tag``, ``system_tag``).
- ``alpaca``: ``instruction``, optional ``input`` (joined to it by a newline, as LLaMA-Factory does),
  ``system`` and ``history`` (``[[user, assistant], ...]``), and ``chosen``/``rejected`` or ``output:
  [chosen, rejected]`` (LLaMA-Factory's ranking form). Rendered with the chat template when there is one,
  else as text in the Alpaca layout of :func:`alpaca_text`.
"""

from __future__ import annotations

from prefmodule.data.messages import OPENAI_TAGS, SHAREGPT_TAGS, MessageError, is_empty, sharegpt_messages
from prefmodule.data.records import Columns, Pair, RowError, field, margin_field, text_field, tools_field


def converted(turns: object, tags: dict[str, str], column: str) -> list[dict]:
    """ShareGPT turns as chat messages; a problem is the row's error, naming ``column``."""
    try:
        return sharegpt_messages(turns, tags)
    except MessageError as error:
        raise RowError(column, str(error), "wrong type") from None


class ShareGPTRows:
    unpaired = False
    conversational = True
    name = "sharegpt"

    def __init__(self, sample: list[dict], columns: Columns, tags: dict[str, str] | None):
        self.column = columns
        mapped = next((columns(t) for t in ("conversations", "messages") if t in columns.names), None)
        self.conversations = mapped or ("conversations" if columns.present(sample, "conversations") else "messages")
        first_turns = next((row[self.conversations] for row in sample if row.get(self.conversations)), None)
        first = first_turns[0] if isinstance(first_turns, list) and first_turns else None
        openai = isinstance(first, dict) and "role" in first and "from" not in first
        self.tags = {**(OPENAI_TAGS if openai else SHAREGPT_TAGS), **(tags or {})}
        self.needed = [self.conversations, columns("chosen"), columns("rejected")]

    def check(self, row: dict) -> Pair:
        column, tags = self.column, self.tags
        prompt = converted(field(row, self.conversations), tags, self.conversations)
        system = text_field(row, column("system"), self.name, optional=True)
        if system:
            prompt = [{"role": "system", "content": system}, *prompt]
        if not prompt:
            raise RowError(self.conversations, "no prompt messages", "empty prompt")
        if prompt[-1]["role"] not in ("user", "tool"):
            raise RowError(self.conversations, f"the last turn is answered by chosen/rejected and should be the "
                                               f"user's (or a tool result), got {prompt[-1]['role']}", "wrong type")
        responses = {}
        for name in ("chosen", "rejected"):
            responses[name] = converted(field(row, column(name)), tags, column(name))
            if not responses[name] or responses[name][0]["role"] != "assistant":
                got = responses[name][0]["role"] if responses[name] else "nothing"
                raise RowError(column(name), f"expected the assistant's turn ({tags['assistant_tag']!r} or "
                                             f"{tags['function_tag']!r}), got {got}", "wrong type")
            if is_empty(responses[name]):
                raise RowError(column(name), "empty response", "empty response")
        if responses["chosen"] == responses["rejected"]:
            raise RowError(column("rejected"), "identical to chosen", "identical responses")
        return Pair(prompt, responses["chosen"], responses["rejected"], tools_field(row, column("tools")),
                    margin=margin_field(row, column("margin")))


class AlpacaRows:
    unpaired = False

    def __init__(self, columns: Columns, chat: bool):
        self.column, self.conversational = columns, chat
        self.name = "alpaca" + ("" if chat else " (text layout: the tokenizer has no chat template)")
        self.needed = [columns("instruction"), columns("chosen"), columns("rejected")]

    def check(self, row: dict) -> Pair:
        column = self.column
        instruction = text_field(row, column("instruction"), "alpaca")
        query = text_field(row, column("input"), "alpaca", optional=True)
        system = text_field(row, column("system"), "alpaca", optional=True)
        history = self._history(row)
        chosen, rejected = self._responses(row)
        user = "\n".join(part for part in (instruction, query) if part)
        if not user.strip():
            raise RowError(column("instruction"), "empty instruction", "empty prompt")
        if not self.conversational:
            return Pair(alpaca_text(system, history, instruction, query), chosen, rejected,
                        margin=margin_field(row, column("margin")))
        prompt = [{"role": "system", "content": system}] if system else []
        for past_user, past_assistant in history:
            prompt += [{"role": "user", "content": past_user}, {"role": "assistant", "content": past_assistant}]
        prompt.append({"role": "user", "content": user})
        return Pair(prompt, [{"role": "assistant", "content": chosen}], [{"role": "assistant", "content": rejected}],
                    tools_field(row, column("tools")), margin=margin_field(row, column("margin")))

    def _history(self, row: dict) -> list:
        column = self.column("history")
        history = row.get(column) or []
        if not isinstance(history, list) or not all(
                isinstance(turn, list) and len(turn) == 2 and all(isinstance(t, str) for t in turn) for turn in history):
            raise RowError(column, f"expected a list of [user, assistant] string pairs, got {history!r:.60}",
                           "wrong type")
        return history

    def _responses(self, row: dict) -> tuple[str, str]:
        column = self.column
        if column("chosen") not in row and column("output") in row:  # LLaMA-Factory's ranking form
            output = row[column("output")]
            if not (isinstance(output, list) and len(output) == 2 and all(isinstance(o, str) for o in output)):
                raise RowError(column("output"), f"expected [chosen, rejected], two strings; got {output!r:.60}",
                               "wrong type")
            chosen, rejected = output
            names = (column("output"), column("output"))
        else:
            chosen, rejected = (text_field(row, column(n), "alpaca") for n in ("chosen", "rejected"))
            names = (column("chosen"), column("rejected"))
        for name, value in zip(names, (chosen, rejected)):
            if not value.strip():
                raise RowError(name, "empty response", "empty response")
        if chosen == rejected:
            raise RowError(names[1], "identical to chosen", "identical responses")
        return chosen, rejected


def alpaca_text(system: str, history: list, instruction: str, query: str) -> str:
    """The prompt as text, for a tokenizer without a chat template (Stanford Alpaca's section headers)::

        {system}\\n\\n                                    (when given)
        ### Instruction:\\n{user}\\n\\n### Response:\\n{assistant}\\n\\n  (each turn of history)
        ### Instruction:\\n{instruction}\\n\\n
        ### Input:\\n{input}\\n\\n                          (when given)
        ### Response:\\n
    """
    parts = [f"{system}\n\n"] if system else []
    parts += [f"### Instruction:\n{user}\n\n### Response:\n{assistant}\n\n" for user, assistant in history]
    parts.append(f"### Instruction:\n{instruction}\n\n")
    if query:
        parts.append(f"### Input:\n{query}\n\n")
    parts.append("### Response:\n")
    return "".join(parts)
