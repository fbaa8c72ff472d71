"""Online DPO (Guo et al., 2024, arXiv 2402.04792): every step samples two completions of each prompt from the policy
being trained, scores them, and applies the DPO loss to the better (chosen) and the worse (rejected), against the
frozen reference; as TRL's ``OnlineDPOTrainer``."""

from __future__ import annotations

import dataclasses

import torch
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor

from prefmodule.data.batches import PairBatch, PromptBatch, SampledPairs
from prefmodule.data.contract import BatchFormat
from prefmodule.errors import ConfigError
from prefmodule.models.generation import GenerationSettings
from prefmodule.models.logps import IGNORE_INDEX, SequenceStats
from prefmodule.objectives.dpo import DPOModule
from prefmodule.objectives.outputs import PairOutputs
from prefmodule.private.lightning import attached_trainer
from prefmodule.sampling.pairs import CompletionScores, scored_completions

SAMPLING_METRICS = ("objective/kl", "objective/entropy", "objective/scores", "objective/scores_margin",
                    "contain_eos_token")


class OnlineDPOModule(DPOModule):
    """Online DPO on prompts (``configs/online_dpo.yaml``): the data holds prompts (any format; its responses, if
    any, unused); each training (and validation) step draws two completions of every prompt of the batch from the
    current policy (out of the autograd graph, modes and random state left as they were), scores them with
    ``reward`` (less ``missing_eos_penalty`` for one that did not end), takes the better as chosen (the first on a
    tie, as TRL), and applies the DPO loss (any ``loss_type`` of :class:`DPOModule`; ``sigmoid`` and ``ipo`` are
    TRL's) against the frozen reference: a copy of the starting policy, the LoRA base (``reference: adapter``) or
    TR-DPO's synced copy.

    Metrics, TRL's names, besides DPO's (``rewards/*``, ``logps/*``, ...): ``objective/kl`` (the mean summed
    log-ratio to the reference of the sampled completions), ``objective/entropy`` (their mean negative summed
    log-prob), ``objective/scores`` (their mean score), ``objective/scores_margin`` (chosen minus rejected score)
    and ``contain_eos_token`` (the share that ended).

    Args:
        reward: a reward model (a ``RewardModule`` export folder or ``.ckpt``) or a function ``module:function``
            called as ``function(prompts, completions) -> list[float]``.
        max_new_tokens, temperature, top_p: how completions are drawn (TRL's defaults 64, 0.9, 1.0).
        generation_seed: seeds each batch's sampling, with its first prompt's row and the optimizer step.
        missing_eos_penalty: subtracted from the score of a completion without EOS (TRL's option).
        **kwargs: see :class:`DPOModule` (``beta``, ``loss_type``, ``reference``, ...).
    """

    citation = ("Online DPO", "Guo et al., 2024, Direct Language Model Alignment from Online AI Feedback",
                "2402.04792")
    loss_citations = {}  # DPO's loss types name their papers for DPO on the data's pairs

    def __init__(self, model: str, reward: str, max_new_tokens: int = 64, temperature: float = 0.9,
                 top_p: float = 1.0, generation_seed: int = 0, missing_eos_penalty: float | None = None, **kwargs):
        super().__init__(model=model, **kwargs)
        if self.hparams.get("reference") == "precomputed":
            raise ConfigError("model.reference='precomputed' cannot score completions sampled while training: use "
                              "copy, adapter (with lora) or sync.")
        self.generation = GenerationSettings(2, max_new_tokens, temperature, top_p, generation_seed)
        self.scores = CompletionScores(reward, missing_eos_penalty)
        self.sampled_tokens = 0  # completion tokens this process sampled in training (train/sampled_tokens: all)

    def batch_format(self) -> BatchFormat:
        return dataclasses.replace(super().batch_format(), prompts=True)

    def extra_metrics(self, stage: str) -> tuple[str, ...]:
        return super().extra_metrics(stage) + SAMPLING_METRICS

    def training_step(self, batch: PromptBatch, batch_idx: int) -> Tensor:
        pairs = self.sampled_pairs(batch)
        self.sampled_tokens += int((pairs.sequences.labels != IGNORE_INDEX).sum())  # the completions are the targets
        self.log("train/sampled_tokens", float(self.sampled_tokens), on_step=True, on_epoch=False, reduce_fx="sum",
                 sync_dist=True, batch_size=1)
        return self._step(pairs, "train")

    def validation_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._step(self.sampled_pairs(batch), "val")

    def test_step(self, batch: PromptBatch, batch_idx: int) -> None:
        self._step(self.sampled_pairs(batch), "test")

    def predict_step(self, batch: PromptBatch, batch_idx: int):
        raise ConfigError("OnlineDPOModule trains; to sample pairs from a policy, predict with SamplePairsModule "
                          "(configs/sample_pairs.yaml)")

    def sampled_pairs(self, batch: PromptBatch) -> SampledPairs:
        """A batch of prompts as a batch of pairs: two completions of each, sampled and scored, the better first."""
        step = self.trainer.global_step if attached_trainer(self) is not None else 0
        seed = self.generation.seed + int(batch.index[0]) + 1_000_003 * step
        completions, _, ended, scores = scored_completions(self, batch, self.generation, self.scores, seed)
        scores = scores.view(-1, 2)
        first_chosen = (scores[:, 0] >= scores[:, 1]).tolist()
        items = [{"index": index, "prompt_ids": prompt_ids,
                  "chosen_ids": completions[2 * i + (not first)], "rejected_ids": completions[2 * i + first],
                  "score_chosen": float(scores[i, int(not first)]), "score_rejected": float(scores[i, int(first)])}
                 for i, (index, prompt_ids, first) in enumerate(zip(batch.index.tolist(), batch.prompt_ids,
                                                                    first_chosen))]
        pairs = self.data_collator()(items)  # laid out as the data's own batches (padded or packed)
        sampled = SampledPairs(**vars(pairs), ended=torch.tensor(ended, dtype=torch.float32))
        return move_data_to_device(sampled, self.device)

    def objective_outputs(self, batch: PairBatch, policy: SequenceStats, reference: Tensor) -> PairOutputs:
        outputs = super().objective_outputs(batch, policy, reference)
        if isinstance(batch, SampledPairs):  # not the data's own pairs (the samples' implicit rewards)
            logratios = torch.cat([outputs.chosen.logps - reference[:, 0], outputs.rejected.logps - reference[:, 1]])
            outputs.extra.update({
                "objective/kl": logratios.detach(),
                "objective/entropy": -torch.cat([outputs.chosen.logps, outputs.rejected.logps]).detach(),
                "objective/scores": torch.cat([batch.score_chosen, batch.score_rejected]),
                "objective/scores_margin": batch.score_chosen - batch.score_rejected,
                "contain_eos_token": batch.ended,
            })
        return outputs
