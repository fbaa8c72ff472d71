"""Chat messages as chat templates take them: checked, and converted from ShareGPT's ``from``/``value`` turns.

A message is ``{"role": str, "content": str}``; an assistant message may instead (or also) carry
``tool_calls`` (OpenAI's ``[{"type": "function", "function": {"name", "arguments"}}]``), and a ``tool``
message holds a tool's result. Other keys (``name``, ``tool_call_id``, ...) are kept for the template.
"""

from __future__ import annotations

import json

# LLaMA-Factory's names for a ShareGPT dataset's keys and roles (its ``dataset_info.json`` "tags").
SHAREGPT_TAGS = {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt",
                 "observation_tag": "observation", "function_tag": "function_call", "system_tag": "system"}
OPENAI_TAGS = {**SHAREGPT_TAGS, "role_tag": "role", "content_tag": "content", "user_tag": "user",
               "assistant_tag": "assistant", "observation_tag": "tool"}


class MessageError(ValueError):
    """What is wrong with a list of messages (the text names the message)."""


def is_messages(value: object) -> bool:
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def message_problem(messages: object, format: str) -> str | None:
    """Why ``messages`` is not a list of chat messages, or None."""
    if not isinstance(messages, list):
        return f"expected a list of {{role, content}} messages ({format} format), got {type_name(messages)}"
    for number, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or not ("content" in message
                                                                           or "tool_calls" in message):
            return f"message {number}: expected an object with 'role' and 'content', got {message!r:.60}"
        if not isinstance(message["role"], str):
            return f"message {number}: 'role' should be a string, got {type_name(message['role'])}"
        tool_calls = message.get("tool_calls")
        if tool_calls is not None and not (isinstance(tool_calls, list) and all(isinstance(c, dict)
                                                                                 for c in tool_calls)):
            return f"message {number}: 'tool_calls' should be a list of objects, got {type_name(tool_calls)}"
        content = message.get("content")
        if not isinstance(content, str) and not (tool_calls and content is None):
            return f"message {number}: 'content' should be a string, got {type_name(content)}"
    return None


def is_empty(value: str | list) -> bool:
    """A blank text, or messages with no text and no tool call."""
    if isinstance(value, str):
        return not value.strip()
    return not any((m.get("content") or "").strip() or m.get("tool_calls") for m in value)


def sharegpt_messages(turns: object, tags: dict[str, str], what: str = "message") -> list[dict]:
    """ShareGPT turns (``{"from": "human", "value": ...}``, or one such turn) as chat messages.

    Roles: user, assistant, system, the function call (an assistant message with ``tool_calls``, from the
    turn's JSON ``{"name", "arguments"}`` or a list of them) and the observation (a ``tool`` message).
    """
    if isinstance(turns, dict):
        turns = [turns]
    if not isinstance(turns, list):
        raise MessageError(f"expected a list of {{{tags['role_tag']}, {tags['content_tag']}}} turns "
                           f"(sharegpt format), got {type_name(turns)}")
    roles = {"user": "user", "assistant": "assistant", "tool": "tool", tags["user_tag"]: "user",
             tags["assistant_tag"]: "assistant", tags["system_tag"]: "system", tags["observation_tag"]: "tool",
             tags["function_tag"]: "function_call"}
    messages = []
    for number, turn in enumerate(turns):
        role_key, content_key = tags["role_tag"], tags["content_tag"]
        if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
            raise MessageError(f"{what} {number}: expected an object with {role_key!r} and {content_key!r}, "
                               f"got {turn!r:.60}")
        role, content = turn[role_key], turn[content_key]
        if role not in roles:
            raise MessageError(f"{what} {number}: unknown role {role!r}; expected one of {sorted(set(roles))} "
                               "(map others with `tags`)")
        if not isinstance(content, str):
            raise MessageError(f"{what} {number}: {content_key!r} should be a string, got {type_name(content)}")
        if roles[role] == "function_call":
            messages.append({"role": "assistant", "content": "", "tool_calls": _tool_calls(content, what, number)})
        else:
            messages.append({"role": roles[role], "content": content})
    return messages


def _tool_calls(value: str, what: str, number: int) -> list[dict]:
    try:
        calls = json.loads(value)
    except json.JSONDecodeError:
        calls = None
    calls = calls if isinstance(calls, list) else [calls]
    if not all(isinstance(c, dict) and isinstance(c.get("name"), str) for c in calls):
        raise MessageError(f"{what} {number}: a function call should be JSON {{\"name\", \"arguments\"}} "
                           f"(or a list of them), got {value!r:.60}")
    return [{"type": "function", "function": {"name": c["name"], "arguments": c.get("arguments", {})}}
            for c in calls]


def parse_tools(value: object) -> list[dict] | None:
    """A ``tools`` cell: OpenAI function schemas as a list, or that list as a JSON string (as TRL reads it)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise MessageError(f"not JSON ({error.msg})") from None
    if not isinstance(value, list) or not all(isinstance(tool, dict) for tool in value):
        raise MessageError(f"expected a list of function schemas (objects), got {type_name(value)}")
    return value


def type_name(value: object) -> str:
    return "null" if value is None else type(value).__name__
