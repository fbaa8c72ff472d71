"""Completions sampled from a policy and scored (every on-policy objective's), and the pairs file of
:class:`~prefmodule.objectives.sample_pairs.SamplePairsModule` (best-of-N, rejection sampling): its writer and its
partial file."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import statistics
import sys
from collections import Counter
from pathlib import Path

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from prefmodule.data.batches import PromptBatch
from prefmodule.errors import ConfigError, DataError, MissingFileError, add_note, find_user_error, finite, require
from prefmodule.models.generation import GenerationSettings, aside_from_training, end_tokens, generate
from prefmodule.models.sharding import is_sharded
from prefmodule.sampling.scorers import (
    FunctionScorer, RewardModelScorer, Scorer, naming_rows, reward_name, scorer_target,
)
from prefmodule.training.callbacks import PredictionWriter, write_jsonl


def sample_completions(module: LightningModule, prompt_ids: list[list[int]], settings: GenerationSettings,
                       seed: int) -> list[list[int]]:
    """``settings.num_completions`` completions of each prompt (a prompt's together, prompt after prompt) from
    ``module.policy``, seeded with ``seed``, leaving training as it was. Every rank calls it together when the
    weights are sharded (each generation step gathers them)."""
    repeated = [ids for ids in prompt_ids for _ in range(settings.num_completions)]
    with aside_from_training(module, seed):
        return generate(module.policy, module.tokenizer, repeated, settings.max_new_tokens, settings.temperature,
                        settings.top_p, synced=is_sharded(module.policy) and module.trainer.world_size > 1)


def scored_completions(module: LightningModule, batch: PromptBatch, settings: GenerationSettings,
                       scores: CompletionScores, seed: int) -> tuple[list[list[int]], list[str], list[bool], Tensor]:
    """A batch of prompts completed and scored: each prompt's ``settings.num_completions`` completions (token ids,
    prompt after prompt), their texts, whether each ended, and their ``[prompts * num_completions]`` scores."""
    completions = sample_completions(module, batch.prompt_ids, settings, seed)
    texts, ended = completion_texts(module, completions)
    prompts, columns = completed_rows(batch.prompt, batch.columns, settings.num_completions)
    with naming_rows(batch.index.tolist(), settings.num_completions):
        return completions, texts, ended, scores(prompts, texts, ended, module.device, completion_ids=completions,
                                                 **columns)


def completed_rows(prompts: list, columns: list[dict | None], repeats: int) -> tuple[list, dict[str, list]]:
    """``prompts`` and their rows' other ``columns`` (keyword lists: a column a row lacks is ``None`` there), each
    repeated ``repeats`` times: aligned with the completions, prompt after prompt."""
    rows = [row or {} for row in columns for _ in range(repeats)]
    names = dict.fromkeys(name for row in rows for name in row)
    prompts = [prompt for prompt in prompts for _ in range(repeats)]
    return prompts, {name: [row.get(name) for row in rows] for name in names}


class CompletionScores:
    """Scores completions with one or more rewards, each a reward model or a function
    (:func:`~prefmodule.sampling.scorers.make_scorer`; a function also takes the rows' columns as keyword
    arguments), summed with ``weights`` (default 1 each), less ``missing_eos_penalty`` for a completion that did
    not end (TRL's option of that name). A reward model is loaded on first use, on the device it is asked for; a
    function is imported now. With ``allow_none`` a function may answer ``None`` for a completion it cannot judge:
    NaN in :meth:`per_reward`, left out of the weighted sum."""

    def __init__(self, reward: str | list[str], missing_eos_penalty: float | None = None,
                 weights: list[float] | None = None, allow_none: bool = False):
        require(missing_eos_penalty is None or (finite(missing_eos_penalty) and missing_eos_penalty >= 0),
                "model.missing_eos_penalty", missing_eos_penalty, "must be >= 0 (subtracted from the score of a "
                "completion without EOS)")
        rewards = [reward] if isinstance(reward, str) else list(reward or [])
        require(bool(rewards), "model.reward", reward, "give a reward model or a function (module:function), or a "
                "list of them")
        self.missing_eos_penalty = missing_eos_penalty
        self.targets = [scorer_target(spec) for spec in rewards]  # checked now: fails before any weights load
        self.names = [reward_name(target) for target in self.targets]
        repeated = sorted({name for name in self.names if self.names.count(name) > 1})
        require(not repeated, "model.reward", reward, f"names {repeated} more than once (each reward is logged "
                "under its name, rewards/<name>/mean)")
        require(weights is None or (len(weights) == len(rewards) and all(finite(w) for w in weights)),
                "model.reward_weights", weights, f"must be {len(rewards)} finite number(s), one per reward "
                f"({', '.join(self.names)})")
        self.weights = [1.0] * len(rewards) if weights is None else [float(w) for w in weights]
        self.scorers: list[Scorer | None] = [None if isinstance(target, str) else FunctionScorer(target, allow_none)
                                             for target in self.targets]

    def per_reward(self, prompts: list, texts: list[str], device: torch.device, **columns) -> Tensor:
        """``[completions, rewards]`` float32: each reward's score of each completion (NaN where a function
        answered ``None``); ``columns``: keyword lists for the functions, aligned with ``texts``."""
        for i, target in enumerate(self.targets):
            if self.scorers[i] is None:
                self.scorers[i] = RewardModelScorer(target, device)
        return torch.tensor([scorer(prompts, texts, **columns) for scorer in self.scorers], dtype=torch.float32,
                            device=device).T.reshape(len(texts), len(self.scorers))

    def combined(self, rewards: Tensor, ended: list[bool]) -> Tensor:
        """``[completions]``: the weighted sum of ``rewards`` (``[completions, rewards]``, NaN terms left out), less
        ``missing_eos_penalty`` for a completion that did not end."""
        scores = (rewards * rewards.new_tensor(self.weights)).nansum(1)
        if self.missing_eos_penalty:
            scores -= self.missing_eos_penalty * (~torch.tensor(ended, device=scores.device))
        return scores

    def __call__(self, prompts: list, texts: list[str], ended: list[bool], device: torch.device, **columns) -> Tensor:
        return self.combined(self.per_reward(prompts, texts, device, **columns), ended)


def completion_texts(module: LightningModule, completions: list[list[int]]) -> tuple[list[str], list[bool]]:
    """Each completion as text (special tokens dropped) and whether it ended with an end token."""
    stops = end_tokens(module.policy, module.tokenizer)
    texts = [module.tokenizer.decode(ids, skip_special_tokens=True) for ids in completions]
    return texts, [bool(ids) and ids[-1] in stops for ids in completions]


def partial_path(path: str, rank: int = 0) -> str:
    """The partial file beside the pairs file ``path`` that rank ``rank`` appends its finished batches to:
    ``pairs.partial.jsonl`` (rank 0), ``pairs.partial.rank1.jsonl``, ..."""
    stem = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
    return f"{stem}.partial.jsonl" if rank == 0 else f"{stem}.partial.rank{rank}.jsonl"


def read_partial(path: str, num_completions: int) -> dict[int, dict]:
    """The rows of a partial file (and of the other ranks' beside it) by data row, checked against
    ``num_completions``; a last line cut short by a kill is left out."""
    if not os.path.isfile(path):
        raise MissingFileError(f"model.resume_partial={path!r}: no such file (a stopped run's "
                               "<pairs>.partial.jsonl)")
    rows = {}
    for name in [path, *sorted(glob.glob(glob.escape(path[: -len(".jsonl")]) + ".rank*.jsonl"))]:
        lines = Path(name).read_text().splitlines()
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
                rows[int(row["index"])] = row
                completions = len(row["scores"])
            except (ValueError, KeyError, TypeError):
                if number == len(lines):
                    break
                raise DataError(f"{name}:{number}: not a row of a partial file of sampled pairs") from None
            if completions != num_completions:
                raise ConfigError(f"model.resume_partial={path!r} holds {completions} completions per prompt and "
                                  f"this run draws {num_completions}: resume with the stopped run's settings")
    return rows


def response(prompt: str | list, text: str) -> str | list:
    """A completion in its prompt's format: text, or one assistant message."""
    return text if isinstance(prompt, str) else [{"role": "assistant", "content": text}]


class PairsWriter(PredictionWriter):
    """Writes the sampled pairs (rows of every rank, each prompt once, in data order) to ``path`` (default
    ``<log dir>/pairs.jsonl``) and says in one line what was sampled; :attr:`summary` holds the same figures.

    Each rank also appends its finished batches' rows to a partial file beside it (:func:`partial_path`), removed
    once the pairs are written. A run stopped by an error keeps it and says so after the error's message; one
    stopped by an interrupt (Ctrl-C) says so in one line: ``model.resume_partial`` continues from it."""

    file_name = "pairs.jsonl"
    option = "model.pairs_path"

    def __init__(self, path: str | None = None):
        super().__init__(path)
        self.summary: dict | None = None
        self.partial: str | None = None  # this rank's partial file, once sampling has started
        self.kept = 0  # rows in it

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.partial, self.kept = partial_path(self.output_path(trainer), trainer.global_rank), 0
        write_jsonl(self.partial, [], what="the partial pairs")  # a stopped run's: read (resume_partial) or replaced

    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: list[dict], batch,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        write_jsonl(self.partial, outputs, append=True, what="the partial pairs")
        self.kept += len(outputs)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        super().write_on_epoch_end(trainer, pl_module, predictions, batch_indices)
        if trainer.is_global_zero:  # the pairs are written: every rank's partial file goes
            for rank in range(trainer.world_size):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(partial_path(self.output_path(trainer), rank))

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if self.partial is None or not os.path.exists(self.partial):
            return
        if not self.kept:
            os.remove(self.partial)
            return
        kept = (f"the {self.kept} prompts sampled are kept in {self.partial}: --model.resume_partial={self.partial} "
                "continues from them")
        if isinstance(exception, KeyboardInterrupt):
            print(f"prefmodule: interrupted; {kept}.", file=sys.stderr)
        else:
            add_note(find_user_error(exception) or exception, f"({kept[0].upper()}{kept[1:]}.)")

    def write(self, rows: list[dict], path: str, pl_module: LightningModule) -> None:
        pairs = [row["pair"] for row in rows if "pair" in row]
        dropped = Counter(row["dropped"] for row in rows if "dropped" in row)
        scores = [score for row in rows for score in row["scores"]]
        write_jsonl(path, pairs, what="the pairs")
        settings = pl_module.generation
        self.summary = {"prompts": len(rows), "completions_per_prompt": settings.num_completions, "pairs": len(pairs),
                        "ties": dropped["ties"], "empty": dropped["empty completions"],
                        "sampled_tokens": sum(row["tokens"] for row in rows),
                        "mean_score": statistics.fmean(scores),
                        "score_std": statistics.pstdev(scores), "min_score": min(scores), "max_score": max(scores),
                        "path": path, "resumed": sum(pl_module.resumed.get(row["index"]) == row for row in rows)}
        s = self.summary
        resumed = f" ({s['resumed']} of them taken from model.resume_partial)" if s["resumed"] else ""
        rank_zero_info(f"prefmodule: sampled {s['prompts']} prompts{resumed} x {s['completions_per_prompt']} "
                       f"completions: "
                       f"{s['pairs']} pairs kept, {s['ties']} ties dropped"
                       + (f", {s['empty']} with fewer than two non-empty completions" if s["empty"] else "")
                       + f"; scores mean {s['mean_score']:.3f} "
                       f"(std {s['score_std']:.3f}, min {s['min_score']:.3f}, max {s['max_score']:.3f}) -> {path}")
