"""What the policy writes: completions of a few held-out prompts, generated without disturbing training
(random state, module modes and gradients as they were), scored with the objective's implicit reward."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden

from prefmodule.data.collate import PreferenceCollator
from prefmodule.errors import ConfigError
from prefmodule.models.generation import aside_from_training, generate

SEED = 0  # sampling (temperature > 0) draws the same random numbers at every call


@dataclass(frozen=True)
class SampleSettings:
    """Completions of held-out prompts, generated at the start of ``fit`` and at each validation.

    Args:
        num_prompts: prompts taken from the validation data, spread evenly over it (the same ones every time);
            0: none.
        max_new_tokens: most tokens of a completion.
        temperature: 0 decodes greedily; above 0 samples at that temperature (seeded).
    """

    num_prompts: int = 4
    max_new_tokens: int = 64
    temperature: float = 0.0

    def __post_init__(self):
        if self.num_prompts < 0:
            raise ConfigError(f"samples.num_prompts must be >= 0 (0 turns the samples off), got {self.num_prompts}")
        if self.max_new_tokens < 1:
            raise ConfigError(f"samples.max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"samples.temperature must be >= 0 (0 = greedy), got {self.temperature}")


def held_out_pairs(trainer: Trainer, count: int) -> list[dict]:
    """``count`` pairs of the datamodule's validation data with distinct prompts, spread evenly over it (the
    same ones at every call); none without validation data."""
    datamodule = trainer.datamodule
    loader = datamodule.val_dataloader() if is_overridden("val_dataloader", datamodule) else None
    dataset = getattr(loader, "dataset", None)
    if not dataset:
        return []

    def spread(n: int) -> list[int]:
        return np.linspace(0, len(dataset) - 1, min(n, len(dataset))).round().astype(int).tolist()

    pairs, prompts = [], set()
    for position in dict.fromkeys(spread(count) + spread(8 * count)):  # the evenly spread ones first
        pair = dataset[position]
        if len(pairs) < count and tuple(pair["prompt_ids"]) not in prompts:
            pairs.append(pair)
            prompts.add(tuple(pair["prompt_ids"]))
    return pairs


def generate_samples(trainer: Trainer, module: LightningModule, pairs: list[dict], settings: SampleSettings) -> list[dict]:
    """One row per pair: its prompt (whole, and ``message``: the last user message of a chat prompt, else
    ``None``), chosen and rejected texts, the policy's completion and that completion's implicit reward
    (``None`` where the objective cannot score new text).

    Every rank must call it under sharded weights (each forward gathers them); all ranks get the same rows.
    """
    tokenizer = module.tokenizer
    with aside_from_training(module, SEED):
        completions = generate(module.policy, tokenizer, [pair["prompt_ids"] for pair in pairs], settings.max_new_tokens,
                               settings.temperature, synced=trainer.world_size > 1)
        rewards = _rewards(trainer, module, pairs, completions)

    def text(ids: list[int] | None) -> str | None:
        return None if ids is None else tokenizer.decode(ids, skip_special_tokens=True)

    template = module.chat_template
    return [
        {"step": trainer.global_step, "index": pair["index"], "prompt": text(pair["prompt_ids"]),
         "message": last_user_message(tokenizer, pair["prompt_ids"], template), "completion": text(completion),
         "reward": reward, "chosen": text(pair["chosen_ids"]), "rejected": text(pair["rejected_ids"])}
        for pair, completion, reward in zip(map(as_pair, pairs), completions, rewards)
    ]


MARK = "PREFMODULE{}MARK"  # stand-ins for message contents when the chat template's turn markers are looked up


def last_user_message(tokenizer, prompt_ids: list[int], chat_template: str | None) -> str | None:
    """The content of the last user turn of a prompt rendered with ``chat_template`` (the tokenizer's own when
    ``None``); ``None`` when the prompt holds no such turn (plain text) or the template's turns cannot be told apart.

    The turn's opening and closing text come from the template itself: the opening is what precedes a user
    message both first in a conversation and after an assistant turn (``<|im_start|>user\n``, Llama 3's header,
    Gemma's ``<start_of_turn>user\n``, ...), the closing what follows it (``<|im_end|>``, ``<|eot_id|>``, ...).
    """
    template = chat_template or tokenizer.chat_template
    if not template:
        return None
    first, assistant, last = (MARK.format(n) for n in range(3))
    try:
        alone = tokenizer.apply_chat_template([{"role": "user", "content": last}], chat_template=template,
                                              tokenize=False)
        after_turns = tokenizer.apply_chat_template(
            [{"role": "user", "content": first}, {"role": "assistant", "content": assistant},
             {"role": "user", "content": last}], chat_template=template, tokenize=False)
    except Exception:  # a template that refuses these conversations (Jinja's own errors): no message to show
        return None
    if not isinstance(alone, str) or alone.count(last) != 1 or assistant not in after_turns:
        return None
    before, closing = alone.split(last)
    opening = os.path.commonprefix([before[::-1], after_turns.split(assistant)[1].split(last)[0][::-1]])[::-1]
    text = tokenizer.decode(prompt_ids, skip_special_tokens=False)
    start = text.rfind(opening.strip()) if opening.strip() else -1
    if start < 0:
        return None
    message = text[start + len(opening.strip()):]
    end = message.find(closing.strip()) if closing.strip() else -1
    return (message[:end] if end >= 0 else message).strip() or None


def as_pair(item: dict) -> dict:
    """A data item as a pair: an unpaired row's completion is its chosen or its rejected answer (by its label),
    the other one ``None``; a prompt alone has neither."""
    if "chosen_ids" in item:
        return item
    if "completion_ids" not in item:
        return {"index": item["index"], "prompt_ids": item["prompt_ids"], "chosen_ids": None, "rejected_ids": None}
    completion = item["completion_ids"]
    return {"index": item["index"], "prompt_ids": item["prompt_ids"],
            "chosen_ids": completion if item["label"] else None, "rejected_ids": None if item["label"] else completion}


def _rewards(trainer: Trainer, module: LightningModule, pairs: list[dict], completions: list[list[int]]) -> list:
    """Each completion's reward: the objective's own rewards of completions (GRPO, RLOO: their reward), or its
    implicit reward: the objective run on pairs (completion, the data's rejected answer, or for an unpaired row
    its completion)."""
    own = module.completion_rewards(pairs, completions)
    if own is not None:
        return own
    answered = "chosen_ids" in pairs[0] or "completion_ids" in pairs[0]
    if not module.scores_new_text or not answered:  # a precomputed reference, or prompts without an answer
        return [None] * len(pairs)
    scored = [{"index": pair["index"], "prompt_ids": pair["prompt_ids"], "chosen_ids": completion,
               "rejected_ids": pair.get("rejected_ids", pair.get("completion_ids"))}
              for pair, completion in zip(pairs, completions)]
    batch = trainer.strategy.batch_to_device(PreferenceCollator(module.tokenizer.pad_token_id)(scored))
    return module.batch_outputs(batch)[0].chosen_rewards.float().tolist()
