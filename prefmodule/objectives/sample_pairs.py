"""Preference pairs sampled from a policy (best-of-N, rejection sampling; Xiong et al., 2023, arXiv 2312.11456;
Llama 3, arXiv 2407.21783; Tulu 3, arXiv 2411.15124): ``predict`` draws N completions of each prompt, scores them,
and keeps the best as chosen and the worst as rejected, in a file that trains DPO as it is."""

from __future__ import annotations

import dataclasses

from prefmodule.data.batches import PromptBatch
from prefmodule.data.contract import BatchFormat
from prefmodule.errors import ConfigError
from prefmodule.models.generation import GenerationSettings
from prefmodule.objectives.base import PreferenceModule
from prefmodule.sampling.pairs import CompletionScores, PairsWriter, read_partial, response, scored_completions


class SamplePairsModule(PreferenceModule):
    """Preference pairs sampled from a policy, with ``predict`` (``configs/sample_pairs.yaml``).

    For each prompt of ``data.predict`` (any format the datamodule reads; a file of prompts alone is enough) it
    draws ``num_completions`` completions from ``model`` (batched, KV-cached ``generate``), scores each with
    ``reward``, and keeps the best as chosen and the worst as rejected of its non-empty completions; a prompt whose
    completions all score the same, or with fewer than two non-empty ones, is dropped and counted. The pairs go to ``pairs_path`` (default ``<log dir>/pairs.jsonl``) in the prompt's
    own format (text, or messages with the completions as assistant turns), with ``score_chosen`` and
    ``score_rejected``: ``fit --config configs/dpo.yaml --data.train=<that file>`` trains on them as they are. Under
    DDP each rank samples its share of the prompts; the file holds each prompt once.

    Each finished batch is also appended to a partial file beside the pairs (:class:`PairsWriter`); a run stopped
    by an error or an interrupt leaves it, and ``resume_partial`` continues from it.

    Args:
        model: the policy that completes the prompts.
        reward: a reward model (a ``RewardModule`` export folder or ``.ckpt``) or a function
            ``module:function`` called as ``function(prompts, completions) -> list[float]``.
        num_completions, max_new_tokens, temperature, top_p, generation_seed: how completions are drawn
            (:class:`~prefmodule.models.generation.GenerationSettings`); each batch is seeded by ``generation_seed``
            and its first prompt's row.
        missing_eos_penalty: subtracted from the score of a completion that did not end within ``max_new_tokens``.
        pairs_path: where the pairs go (default ``<log dir>/pairs.jsonl``).
        resume_partial: the partial file a stopped run left (``<pairs>.partial.jsonl``): the batches it holds are
            taken as they were sampled and the others sampled, as the stopped run would have (same data, batch size
            and settings); ``None``: sample everything.
        **kwargs: see :class:`PreferenceModule` (``tokenizer``, ``dtype``, ``attn_implementation``, ...).
    """

    token_logps = False  # nothing is scored through the LM head
    run_time = PreferenceModule.run_time + ("pairs_path", "resume_partial")

    def __init__(self, model: str, reward: str, num_completions: int = 4, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, generation_seed: int = 0,
                 missing_eos_penalty: float | None = None, pairs_path: str | None = None,
                 resume_partial: str | None = None, **kwargs):
        super().__init__(model=model, **kwargs)
        self.generation = GenerationSettings(num_completions, max_new_tokens, temperature, top_p, generation_seed)
        self.scores = CompletionScores(reward, missing_eos_penalty)
        self.pairs_path = pairs_path
        self.resumed = read_partial(resume_partial, num_completions) if resume_partial else {}

    def batch_format(self) -> BatchFormat:
        return dataclasses.replace(super().batch_format(), prompts=True)

    def training_step(self, batch, batch_idx):
        raise ConfigError("SamplePairsModule samples pairs with `predict`; train on them with an objective "
                          "(e.g. fit --config configs/dpo.yaml --data.train=<its pairs.jsonl>)")

    def predict_step(self, batch: PromptBatch, batch_idx: int) -> list[dict]:
        """One row per prompt: its pair and its completions' scores, or ``tie`` when all score the same."""
        done = [self.resumed.get(index) for index in batch.index.tolist()]
        if done and all(done):  # sampled by the run that left ``resume_partial``
            return done
        n = self.generation.num_completions
        completions, texts, _, scores = scored_completions(self, batch, self.generation, self.scores,
                                                           self.generation.seed + int(batch.index[0]))
        scores = scores.tolist()
        rows = []
        for i, (index, prompt, tools) in enumerate(zip(batch.index.tolist(), batch.prompt, batch.tools)):
            own = scores[i * n:(i + 1) * n]
            row = {"index": index, "scores": own, "tokens": sum(map(len, completions[i * n:(i + 1) * n]))}
            # an empty completion (an end token at once) is no response to train on
            said = [k for k in range(n) if texts[i * n + k].strip()]
            best, worst = max(said, key=own.__getitem__, default=0), min(said, key=own.__getitem__, default=0)
            if len(said) < 2:
                row["dropped"] = "empty completions"
            elif own[best] == own[worst]:
                row["dropped"] = "ties"
            else:
                row["pair"] = {"prompt": prompt, "chosen": response(prompt, texts[i * n + best]),
                               "rejected": response(prompt, texts[i * n + worst]), "score_chosen": own[best],
                               "score_rejected": own[worst], **({"tools": tools} if tools else {})}
            rows.append(row)
        return rows

    def configure_callbacks(self):
        return [PairsWriter(self.pairs_path)]
