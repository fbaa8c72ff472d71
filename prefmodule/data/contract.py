"""The one contract between an objective and its data: :class:`BatchFormat`, what the module being trained
needs, handed to the datamodule through ``PreferenceDataModule.connect`` before Lightning's data hooks run, and
:class:`Connection`, its answer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from prefmodule.data.collate import PreferenceCollator
from prefmodule.models.attention import PackedAttention


@dataclass(frozen=True)
class BatchFormat:
    """What batches an objective trains on.

    Args:
        tokenizer: tokenises the data (the datamodule's own ``tokenizer`` setting takes precedence).
        unpaired: items are unpaired rows (KTO: a paired file gives two rows per pair) rather than pairs.
        kl_completions: each unpaired row carries a KL completion (KTO's reference point).
        packing: asked when batches are laid out (the models are placed by then): whether the module's models
            attend to packed rows per sequence, so batches go in one row without padding; its ``reason`` when
            they do not (said in one line). ``None``: padded batches.
        prompts: items are prompts alone, to complete (on-policy sampling, Online DPO): ``prompt_ids``, and the
            prompt as the data holds it (``prompt``, ``tools``), from any format.
        predicts_either: ``predict`` takes pairs and unpaired rows as the data holds them (KTO, reward models);
            otherwise it takes items as the objective trains on them.
        objective: the objective's name, for messages about data it cannot train on.
        repeats: each training batch comes this many times in a row (with gradient accumulation, each optimizer
            step's run of batches): GRPO's ``num_iterations``, a generation batch reused.
    """

    tokenizer: PreTrainedTokenizerBase
    unpaired: bool = False
    kl_completions: bool = False
    packing: Callable[[], PackedAttention] | None = None
    prompts: bool = False
    predicts_either: bool = False
    objective: str = "a paired objective"
    repeats: int = 1


@dataclass(frozen=True)
class Connection:
    """What the datamodule answers ``connect``.

    Args:
        chat_template: the template conversations are rendered with (``None``: the tokenizer's own), which the
            export saves with the tokenizer.
        collator: builds the datamodule's collator (padded or packed, its padding multiple; asked when a batch is
            laid out, once the models are placed), for batches an objective builds from items of its own (Online
            DPO's sampled pairs, GRPO's completions), laid out as the data's are.
    """

    chat_template: str | None
    collator: Callable[[], PreferenceCollator]
