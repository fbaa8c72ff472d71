"""Tokenising a preference pair as TRL does for the standard format.

The prompt is tokenised alone and together with each response (EOS appended when missing);
the response tokens are what follows the common prefix, so token merges across the
boundary match what the model sees at inference. BOS is whatever the tokenizer adds.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def common_prefix_length(a: list[int], b: list[int]) -> int:
    length = 0
    for x, y in zip(a, b):
        if x != y:
            break
        length += 1
    return length


def tokenize_pair(tokenizer: PreTrainedTokenizerBase, prompt: str, chosen: str, rejected: str,
                  max_length: int | None = None) -> dict[str, list[int]] | None:
    """``{"prompt_ids", "chosen_ids", "rejected_ids"}``, or None when truncation leaves a response empty.

    With ``max_length`` each ``prompt + response`` keeps its first ``max_length`` tokens
    (TRL's ``keep_start``).
    """
    eos = tokenizer.eos_token
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids = tokenizer(prompt)["input_ids"]
    prompt_chosen = tokenizer(prompt + chosen)["input_ids"]
    prompt_rejected = tokenizer(prompt + rejected)["input_ids"]
    split = min(common_prefix_length(prompt_ids, prompt_chosen), common_prefix_length(prompt_ids, prompt_rejected))
    pair = {
        "prompt_ids": prompt_ids[:split],
        "chosen_ids": prompt_chosen[split:],
        "rejected_ids": prompt_rejected[split:],
    }
    if max_length is not None:
        room = max_length - split
        if room <= 0:
            return None
        pair["chosen_ids"] = pair["chosen_ids"][:room]
        pair["rejected_ids"] = pair["rejected_ids"][:room]
    return pair
