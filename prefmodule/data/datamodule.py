"""``PreferenceDataModule``: preference pairs from files, tokenised and batched for any objective."""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Literal

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.formats import read_jsonl
from prefmodule.data.tokenize import tokenize_pair
from prefmodule.hf import load_tokenizer
from prefmodule.paths import resolve

log = logging.getLogger(__name__)


class PreferenceDataModule(LightningDataModule):
    """Preference pairs ``{"prompt", "chosen", "rejected"}`` from JSONL files.

    Args:
        train: training file.
        val: held-out file; without it, ``val_fraction`` of ``train`` is split off (seeded).
        test: file for ``test``; defaults to ``val``.
        predict: file for ``predict``; defaults to ``val``.
        val_fraction: share of ``train`` held out when ``val`` is not given (0 = no validation).
        seed: seed of that split.
        batch_size: pairs per training batch (each pair is two sequences).
        eval_batch_size: pairs per evaluation batch; defaults to ``batch_size``.
        max_length: longest ``prompt + response`` in tokens; longer responses are cut at the end.
        tokenizer: path or hub id; by default the model's tokenizer.
        on_bad_rows: ``error`` stops on any malformed row, ``skip`` trains on the good ones.
        num_workers: DataLoader worker processes.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        predict: str | None = None,
        val_fraction: float = 0.0,
        seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int | None = 1024,
        tokenizer: str | None = None,
        on_bad_rows: Literal["error", "skip"] = "error",
        num_workers: int = 0,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
        self.save_hyperparameters()
        self.tokenizer = tokenizer
        self.datasets: dict[str, list[dict]] = {}

    def resolve_tokenizer(self) -> PreTrainedTokenizerBase:
        """The given tokenizer, else the one of the module being trained."""
        if isinstance(self.tokenizer, PreTrainedTokenizerBase):
            return self.tokenizer
        if self.tokenizer is not None:
            self.tokenizer = load_tokenizer(self.tokenizer)
            return self.tokenizer
        module = self.trainer.lightning_module if self.trainer is not None else None
        if module is None or getattr(module, "tokenizer", None) is None:
            raise ValueError("PreferenceDataModule needs a tokenizer: pass `tokenizer=` or attach it to a Trainer "
                             "with a prefmodule module.")
        self.tokenizer = module.tokenizer
        return self.tokenizer

    def setup(self, stage: str) -> None:
        hp = self.hparams
        tokenizer = self.resolve_tokenizer()
        if stage == "fit":
            if hp.train is None:
                raise ValueError("`fit` needs training data: set `data.train`.")
            train_rows = self._read(hp.train)
            val_rows = self._read(hp.val) if hp.val else []
            if not hp.val and hp.val_fraction > 0:
                train_rows, val_rows = split_rows(train_rows, hp.val_fraction, hp.seed)
            self.datasets["train"] = self._tokenize(train_rows, tokenizer, "train")
            self.datasets["val"] = self._tokenize(val_rows, tokenizer, "val") if val_rows else []
        else:
            name = {"validate": "val", "test": "test", "predict": "predict"}[stage]
            source = {"val": hp.val, "test": hp.test or hp.val, "predict": hp.predict or hp.val}[name]
            if source is None:
                raise ValueError(f"`{stage}` needs data: set `data.{name}`" + ("" if name == "val" else " or `data.val`"))
            self.datasets[name] = self._tokenize(self._read(source), tokenizer, name)

    def _read(self, path: str) -> list[dict]:
        return read_jsonl(resolve(path), self.hparams.on_bad_rows).rows

    def _tokenize(self, rows: list[dict], tokenizer: PreTrainedTokenizerBase, name: str) -> list[dict]:
        pairs, dropped = [], Counter()
        for index, row in enumerate(rows):
            pair = tokenize_pair(tokenizer, row["prompt"], row["chosen"], row["rejected"], self.hparams.max_length)
            if pair is None:
                dropped["prompt fills max_length"] += 1
                continue
            pairs.append({"index": index, **pair})
        lengths = sorted(len(p["prompt_ids"]) + max(len(p["chosen_ids"]), len(p["rejected_ids"])) for p in pairs)
        log.info("%s: %d pairs kept of %d%s; tokens per sequence p50=%d max=%d", name, len(pairs), len(rows),
                 "".join(f", {n} dropped ({why})" for why, n in dropped.items()),
                 lengths[len(lengths) // 2] if lengths else 0, lengths[-1] if lengths else 0)
        if not pairs:
            raise ValueError(f"{name}: no pair left after tokenisation (max_length={self.hparams.max_length})")
        return pairs

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        size = self.hparams.batch_size if name == "train" else (self.hparams.eval_batch_size or self.hparams.batch_size)
        return DataLoader(
            self.datasets[name], batch_size=size, shuffle=shuffle, num_workers=self.hparams.num_workers,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id),
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val", shuffle=False) if self.datasets.get("val") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False)


def split_rows(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split into ``(train, held_out)`` with ``round(fraction * len(rows))`` rows held out (at least 1)."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    held = max(1, round(fraction * len(rows)))
    held_out = set(order[:held])
    return [r for i, r in enumerate(rows) if i not in held_out], [rows[i] for i in sorted(held_out)]
