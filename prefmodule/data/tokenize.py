"""Tokenising preference pairs exactly as TRL's ``DPOTrainer`` does, then truncating them.

The prompt is tokenised alone and together with each response; the response tokens are what
follows the common prefix, so token merges across the boundary match what the model sees at
inference. Text: BOS is whatever the tokenizer adds and EOS is appended to each response when
missing. Messages: rendered with the chat template (the prompt with ``add_generation_prompt=True``),
no special tokens added beyond the template's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

from transformers import PreTrainedTokenizerBase

from prefmodule.data.formats import common_prefix_length

TruncationMode = Literal["keep_end", "keep_start"]
PROMPT_FILLS_MAX_LENGTH = "prompt fills max_length"
EMPTY_AFTER_TOKENISATION = "response empty after tokenisation"


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str | list, chosen: str | list, rejected: str | list,
                  max_length: int | None = None, max_prompt_length: int | None = None,
                  truncation_mode: TruncationMode = "keep_end",
                  chat_template: str | None = None) -> dict[str, list[int]] | None:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}`` of one pair, or None when truncation leaves no response."""
    (result,) = tokenize_pairs(tokenizer, [prompt], [chosen], [rejected], max_length, max_prompt_length,
                               truncation_mode, chat_template)
    return None if isinstance(result, str) else result


def tokenize_pairs(tokenizer: PreTrainedTokenizerBase, prompts: list, chosens: list, rejecteds: list,
                   max_length: int | None = None, max_prompt_length: int | None = None,
                   truncation_mode: TruncationMode = "keep_end", chat_template: str | None = None,
                   chunk_size: int = 1024) -> Iterator[dict[str, list[int]] | str]:
    """Per pair, its ids (as :func:`tokenize_pair`) or the reason it is dropped; batched through the fast tokenizer.

    ``max_prompt_length`` first cuts a longer prompt, keeping its end (the turn nearest the response, with
    BOS kept first) or its start. ``max_length`` then cuts each response so that prompt + response fits;
    a pair whose prompt leaves no room is dropped (as TRL's ``keep_start``).
    """
    for start in range(0, len(prompts), chunk_size):
        end = start + chunk_size
        encoded = _encode(tokenizer, prompts[start:end], chosens[start:end], rejecteds[start:end], chat_template)
        for prompt_ids, prompt_chosen, prompt_rejected in zip(*encoded):
            yield _truncate(
                *_split(prompt_ids, prompt_chosen, prompt_rejected),
                max_length, max_prompt_length, truncation_mode, tokenizer.bos_token_id,
            )


def _encode(tokenizer, prompts: list, chosens: list, rejecteds: list, chat_template: str | None):
    """Token ids of ``prompt``, ``prompt + chosen`` and ``prompt + rejected`` for each row."""
    if isinstance(prompts[0], list):
        def render(conversations, **kwargs):
            texts = tokenizer.apply_chat_template(conversations, tokenize=False, chat_template=chat_template, **kwargs)
            return tokenizer(texts, add_special_tokens=False)["input_ids"]

        return (
            render(prompts, add_generation_prompt=True),
            render([p + c for p, c in zip(prompts, chosens)]),
            render([p + r for p, r in zip(prompts, rejecteds)]),
        )
    eos = tokenizer.eos_token
    return (
        tokenizer(prompts)["input_ids"],
        tokenizer([p + c + ("" if c.endswith(eos) else eos) for p, c in zip(prompts, chosens)])["input_ids"],
        tokenizer([p + r + ("" if r.endswith(eos) else eos) for p, r in zip(prompts, rejecteds)])["input_ids"],
    )


def _split(prompt_ids: list[int], prompt_chosen: list[int], prompt_rejected: list[int]):
    """The prompt is the part of ``prompt_ids`` both full sequences start with (usually all of it)."""
    n = len(prompt_ids)
    if prompt_chosen[:n] != prompt_ids or prompt_rejected[:n] != prompt_ids:
        n = min(common_prefix_length(prompt_ids, prompt_chosen), common_prefix_length(prompt_ids, prompt_rejected))
    return prompt_ids[:n], prompt_chosen[n:], prompt_rejected[n:]


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None,
              max_prompt_length: int | None, mode: TruncationMode, bos_token_id: int | None):
    if max_prompt_length is not None and len(prompt) > max_prompt_length:
        if mode == "keep_start":
            prompt = prompt[:max_prompt_length]
        else:
            head = prompt[:1] if bos_token_id is not None and prompt[0] == bos_token_id else []
            prompt = head + prompt[len(prompt) - max_prompt_length + len(head):]
    if max_length is not None:
        room = max_length - len(prompt)
        if room <= 0:
            return PROMPT_FILLS_MAX_LENGTH
        chosen, rejected = chosen[:room], rejected[:room]
    if not chosen or not rejected:
        return EMPTY_AFTER_TOKENISATION
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}
