"""``PreferenceDataModule``: preference pairs from files or the Hub, validated, tokenised, cached and batched."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from prefmodule.data import cache
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.dataset import PairDataset
from prefmodule.data.formats import BadRow, DataValidationError, Format, check_settings, describe, read_rows
from prefmodule.data.samplers import EpochSampler, PairBatchSampler, ResumableLoader
from prefmodule.data.sources import find_sources
from prefmodule.data.tokenize import TruncationMode, tokenize_pairs
from prefmodule.hf import load_tokenizer
from prefmodule.paths import resolve

STAGE_SPLITS = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


class PreferenceDataModule(LightningDataModule):
    """Preference pairs from local files or a Hugging Face dataset, checked row by row before training.

    Data (``train``, ``val``, ``test``, ``predict``): a ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file,
    a glob (``data/*.parquet``), a list of these, or a Hub dataset ``owner/name`` with optional
    ``?split=...&subset=...&revision=...`` (split defaults to ``train`` for ``train``, ``test`` otherwise).
    Formats (SPEC.md §7): standard, conversational, implicit prompt (see ``format``).

    Each batch holds ``index``, every pair's row number among all rows of its split's files (bad and
    dropped rows included), so results map back to the data.

    Args:
        train: training data.
        val: held-out data; without it, ``val_fraction`` of ``train`` is split off (seeded).
        test: data for ``test``; defaults to ``val``.
        predict: data for ``predict``; defaults to ``val``.
        val_fraction: share of ``train`` held out when ``val`` is not given (0 = no validation).
        seed: seed of that split and of the training order.
        batch_size: pairs per training batch and device (each pair is two sequences).
        eval_batch_size: pairs per evaluation batch; defaults to ``batch_size``.
        max_length: most tokens of ``prompt + response``; longer responses are cut at the end, and a pair whose
            prompt leaves no room for a response is dropped (and counted).
        tokenizer: path or hub id; by default the model's tokenizer.
        on_bad_rows: ``error`` stops before training on any malformed row (listing the first 20 by file, line or
            row, and field), ``skip`` trains on the good rows and reports the same list.
        num_workers: DataLoader worker processes.
        format: ``auto`` (detected from the first row), ``standard`` (text ``prompt``/``chosen``/``rejected``),
            ``conversational`` (lists of ``{role, content}`` messages, rendered with the chat template), or
            ``implicit`` (whole texts or dialogues in ``chosen``/``rejected``; the prompt is their common
            beginning, HH ``\\n\\nHuman: ... \\n\\nAssistant:`` dialogues split at the last assistant turn).
        columns: the dataset's column names for ``prompt``/``chosen``/``rejected``, e.g. ``{question: prompt}``.
        chat_template: Jinja chat template for conversational data instead of the tokenizer's: the template
            itself, or the path of a file holding it.
        max_prompt_length: most prompt tokens; a longer prompt is cut as ``truncation_mode`` says.
        truncation_mode: which end of a long prompt is kept: ``keep_end`` (the turn nearest the response; BOS
            stays first) or ``keep_start``.
        group_by_length: batch pairs of similar length together (less padding); still shuffled every epoch.
        padding_free: pack each batch into one row without padding (``position_ids`` restart per sequence);
            same log-probs as padded batches, less compute and memory. ``None`` (default): pack when the
            module's models attend to packed rows per sequence (``sdpa`` and flash-attention models), else pad.
        pad_to_multiple_of: round the padded width up to a multiple of this.
        cache_dir: where tokenised data is cached (default ``~/.cache/prefmodule/data``), keyed by the data's
            content, the tokenizer and these settings.
    """

    def __init__(
        self,
        train: str | list[str] | None = None,
        val: str | list[str] | None = None,
        test: str | list[str] | None = None,
        predict: str | list[str] | None = None,
        val_fraction: float = 0.0,
        seed: int = 42,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        max_length: int | None = 1024,
        tokenizer: str | None = None,
        on_bad_rows: Literal["error", "skip"] = "error",
        num_workers: int = 0,
        format: Format = "auto",
        columns: dict[str, str] | None = None,
        chat_template: str | None = None,
        max_prompt_length: int | None = None,
        truncation_mode: TruncationMode = "keep_end",
        group_by_length: bool = False,
        padding_free: bool | None = None,
        pad_to_multiple_of: int | None = None,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if not 0.0 <= val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        for name, value in (("batch_size", batch_size), ("eval_batch_size", eval_batch_size),
                            ("max_length", max_length), ("max_prompt_length", max_prompt_length),
                            ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_length is not None and max_prompt_length is not None and max_prompt_length >= max_length:
            raise ValueError(f"max_prompt_length ({max_prompt_length}) must be below max_length ({max_length}), "
                             "or no response would fit")
        if on_bad_rows not in ("error", "skip"):
            raise ValueError(f"on_bad_rows must be 'error' or 'skip', got {on_bad_rows!r}")
        if truncation_mode not in ("keep_end", "keep_start"):
            raise ValueError(f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}")
        check_settings(format, columns)
        self.save_hyperparameters()
        self.tokenizer = tokenizer
        self.datasets: dict[str, PairDataset | list] = {}
        self._loaded: dict[str, PairDataset] = {}  # by cache key: each source is read and reported once

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

    # ----- Lightning hooks ---------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Read, validate, tokenise and cache the data of the current stage, once per node, before ``setup``."""
        if self.trainer is not None and self.trainer.state.fn is not None:
            for split in STAGE_SPLITS[self.trainer.state.fn.value]:
                if found := self._data_of(split):
                    self._load(*found)

    def setup(self, stage: str) -> None:
        for split in STAGE_SPLITS[stage]:
            self.datasets[split] = self._dataset(split, optional=stage == "fit" and split == "val")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def on_before_batch_transfer(self, batch, dataloader_idx: int):
        """Count the training batches that reach the model: the position a mid-epoch checkpoint resumes from."""
        loader = self.trainer.train_dataloader if self.trainer is not None and self.trainer.training else None
        if isinstance(loader, ResumableLoader):
            loader.trained += 1
        return batch

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self.datasets.get("val") else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    # ----- data ----------------------------------------------------------------------------------------
    def _data_of(self, split: str) -> tuple[str | list[str], str] | None:
        """What ``split`` is read from: ``(data, "train")`` when it is (part of) the training data."""
        hp = self.hparams
        data = {"train": hp.train, "val": hp.val, "test": hp.test or hp.val, "predict": hp.predict or hp.val}[split]
        if data is not None:
            return data, split
        if split != "train" and self._holds_out():
            return hp.train, "train"
        return None

    def _holds_out(self) -> bool:
        return self.hparams.val_fraction > 0 and not self.hparams.val and self.hparams.train is not None

    def _dataset(self, split: str, optional: bool = False) -> PairDataset | list:
        hp = self.hparams
        found = self._data_of(split)
        if found is None:
            if optional:
                return []
            if split == "train":
                raise ValueError("`fit` needs training data: set `data.train`.")
            raise ValueError(f"no {split} data: set `data.{split}`" + ("" if split == "val" else " or `data.val`")
                             + " (or `data.val_fraction` with `data.train`)")
        dataset = self._load(*found)
        if found[1] != "train" or not self._holds_out():
            return dataset
        kept, held = split_positions(len(dataset), hp.val_fraction, hp.seed)
        if split == "train":
            rank_zero_info(f"prefmodule data: {len(held)} pairs of train held out for validation "
                           f"(val_fraction={hp.val_fraction}, seed={hp.seed}), {len(kept)} left to train on")
        return dataset.select(kept if split == "train" else held)

    def _load(self, data: str | list[str], split: str) -> PairDataset:
        """All pairs of ``data``: from the cache, or read, validated, tokenised and cached."""
        hp = self.hparams
        tokenizer = self.resolve_tokenizer()
        sources = find_sources(data, "train" if split == "train" else "test")
        chat_template = self._chat_template()
        key = cache.cache_key(
            sources=[source.fingerprint() for source in sources],
            tokenizer=cache.tokenizer_fingerprint(tokenizer, chat_template),
            format=hp.format, columns=hp.columns, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length,
            truncation_mode=hp.truncation_mode,
        )
        if key in self._loaded:
            return self._loaded[key]
        cache_dir = hp.cache_dir or cache.DEFAULT_DIR
        found = cache.load(cache_dir, key)
        if isinstance(found, tuple):
            dataset, meta = found
            status = f"cache hit: {Path(cache_dir).expanduser() / key}"
        else:
            if found != "miss":
                rank_zero_warn(f"prefmodule data: cached {split} data {found}; tokenising again")
            dataset, meta = self._tokenize(sources, tokenizer, chat_template, split)
            try:
                status = f"cache miss, saved to {cache.save(cache_dir, key, dataset, meta)}"
            except OSError as error:
                status = f"cache miss, not saved ({error})"
        self._report(split, data, meta, dataset, status)
        self._loaded[key] = dataset
        return dataset

    def _tokenize(self, sources, tokenizer, chat_template: str | None, split: str) -> tuple[PairDataset, dict]:
        hp = self.hparams
        rows = read_rows(sources, hp.format, hp.columns)
        if rows.bad and hp.on_bad_rows == "error":
            raise DataValidationError(rows.bad, rows.total)
        if not rows.index:
            raise ValueError(f"{split}: no usable rows ({rows.total} read) in {[s.label for s in sources]}")
        if rows.conversational and not (chat_template or tokenizer.chat_template):
            raise ValueError(f"{split}: conversational data needs a chat template and the tokenizer has none; "
                             "set `data.chat_template` (Jinja text or a .jinja file).")
        rank_zero_info(f"prefmodule data: {split}: tokenising {len(rows.index)} pairs (cached for the next run)")
        dropped = Counter()

        def kept():
            results = tokenize_pairs(tokenizer, rows.prompt, rows.chosen, rows.rejected, hp.max_length,
                                     hp.max_prompt_length, hp.truncation_mode, chat_template)
            for index, result in zip(rows.index, results):
                if isinstance(result, str):
                    dropped[result] += 1
                else:
                    yield index, result

        dataset = PairDataset.from_pairs(kept())
        if not len(dataset):
            raise ValueError(f"{split}: no pair left after tokenisation (max_length={hp.max_length}, "
                             f"max_prompt_length={hp.max_prompt_length})")
        meta = {"rows": rows.total, "format": rows.format, "conversational": rows.conversational,
                "bad": [asdict(b) for b in rows.bad], "dropped": dict(dropped)}
        return dataset, meta

    def _report(self, split: str, data, meta: dict, dataset: PairDataset, status: str) -> None:
        """The start summary; raises on bad rows stored in a cache entry when ``on_bad_rows`` is ``error``."""
        bad = [BadRow(**b) for b in meta["bad"]]
        if bad and self.hparams.on_bad_rows == "error":
            raise DataValidationError(bad, meta["rows"])
        dropped = Counter(b.kind for b in bad) + Counter(meta["dropped"])
        reasons = ", ".join(f"{n} {reason}" for reason, n in dropped.most_common())
        reasons = f", {sum(dropped.values())} dropped ({reasons})" if dropped else ""
        lengths = dataset.lengths()
        p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
        kind = meta["format"] + (" (messages)" if meta["format"] == "implicit" and meta["conversational"] else "")
        rank_zero_info(
            f"prefmodule data: {split} <- {data} ({kind} format): {meta['rows']} rows read, {len(dataset)} pairs "
            f"kept{reasons}; tokens per pair (prompt + longer response) p50={p50} p90={p90} p99={p99} "
            f"max={lengths.max()}; {status}"
        )
        if bad:
            rank_zero_info(f"prefmodule data: skipped {len(bad)} bad rows of {split}:\n  {describe(bad)}")

    def _chat_template(self) -> str | None:
        """The ``chat_template`` setting as Jinja text: given inline, or read from the file it names."""
        template = self.hparams.chat_template
        if template is None or "{{" in template or "{%" in template:
            return template
        return Path(resolve(template)).read_text()

    def packs(self) -> bool:
        """Whether batches are packed: ``padding_free``, or when unset, what the trained module's models allow."""
        if self.hparams.padding_free is not None:
            return self.hparams.padding_free
        module = self.trainer.lightning_module if self.trainer is not None else None
        return bool(getattr(module, "packed_attention", False))

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        dataset = self.datasets[split]
        size = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        shard = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        batches = PairBatchSampler(
            EpochSampler(dataset), size, lengths=dataset.lengths() if hp.group_by_length else None,
            shuffle=split == "train", seed=hp.seed, num_replicas=shard.get("num_replicas", 1), rank=shard.get("rank", 0),
        )
        return ResumableLoader(
            dataset, batch_sampler=batches, num_workers=hp.num_workers,
            collate_fn=PreferenceCollator(self.tokenizer.pad_token_id, hp.pad_to_multiple_of, self.packs()),
            persistent_workers=hp.num_workers > 0,
        )


def split_positions(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(count)`` into ``(kept, held_out)``, ``round(fraction * count)`` held out (at least 1)."""
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(fraction * count))
    return np.sort(order[held:]), np.sort(order[:held])
