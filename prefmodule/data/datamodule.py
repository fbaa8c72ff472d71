"""``PreferenceDataModule``: preference data from files or the Hub, validated, tokenised, cached and batched."""

from __future__ import annotations

import itertools
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from prefmodule.data.checks import check_arguments
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.contract import BatchFormat, Connection
from prefmodule.data.dataset import PairDataset, PromptDataset, Table, UnpairedDataset
from prefmodule.data.formats import (
    DETECTION_ROWS, BadRow, DataValidationError, Format, PairsFromRatings, describe, make_checker,
)
from prefmodule.data.mixture import Mixture, SourceGroup
from prefmodule.data.prepare import Settings, prepare, prompt_items
from prefmodule.data.samplers import (
    ChunkBatchSampler, EpochSampler, PairBatchSampler, ResumableLoader, chunk_sizes, kl_chunks,
)
from prefmodule.data.sources import FileSource, find_sources
from prefmodule.data.tokenize import Encoder, TruncationMode, tokenizer_fingerprint
from prefmodule import cache
from prefmodule.errors import ConfigError, DataError, UserError
from prefmodule.models.loading import load_tokenizer
from prefmodule.paths import resolve

DEFAULT_CACHE_DIR = "~/.cache/prefmodule/data"
SPLITS_OF_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
DataSpec = str | list[str | dict[str, Any]] | dict[str, Any] | None


class PreferenceDataModule(LightningDataModule):
    """Preference data from local files or a Hugging Face dataset, checked row by row before training.

    Data (``train``, ``val``, ``test``, ``predict``): a ``.jsonl``, ``.json``, ``.parquet`` or ``.csv`` file,
    a glob (``data/*.parquet``), a list of these, or a Hub dataset ``owner/name`` with optional
    ``?split=...&subset=...&revision=...`` (split defaults to ``train`` for ``train``, ``test`` otherwise); or a
    list of ``{path, weight, format, columns, tags, pairs_from_ratings}`` sources, each read with its own
    settings and, with weights, drawn by weight every training epoch (see :mod:`prefmodule.data.mixture`).

    What a batch holds follows the objective being trained, which says what it needs through :meth:`connect` (a
    :class:`~prefmodule.data.contract.BatchFormat`: its tokenizer, pairs or unpaired rows, KL completions, packed
    batches) before Lightning's ``prepare_data`` and ``setup`` run: the CLI connects them, and from Python
    ``module.connect(data)`` does. Pairs (DPO, ORPO, SimPO, ...), or for KTO unpaired rows (a paired file gives
    two rows per pair), with a KL completion per row. See :class:`~prefmodule.data.collate.PreferenceCollator`.
    Without a connection (data alone, or another module) the datamodule's own settings say it: ``tokenizer`` is
    then needed. Whether batches are packed settles when the loaders are built, once the models are placed.

    Each batch holds ``index``, every item's row number among all rows of its split's sources (bad and dropped
    rows included), so results map back to the data; an unpaired row made of a pair's rejected response has
    ``index`` = the split's rows read + its row number.

    Args:
        train: training data.
        val: held-out data; without it, ``val_fraction`` of ``train`` is split off (seeded, by row).
        test: data for ``test``; defaults to ``val``.
        predict: data for ``predict``; defaults to ``val``.
        val_fraction: share of ``train`` held out when ``val`` is not given (0 = no validation).
        seed: seed of that split, of the training order, of KL chunks and of ``best_random`` pairs.
        batch_size: pairs (or unpaired rows) per training batch and device.
        eval_batch_size: pairs per evaluation batch; defaults to ``batch_size``.
        max_length: most tokens of ``prompt + response``; longer responses are cut at the end, and a pair whose
            prompt leaves no room for a response is dropped (and counted).
        tokenizer: path or hub id; by default the connected objective's (the model's).
        on_bad_rows: ``error`` stops before training on any malformed row (listing the first 20 by file, line or
            row, and field), ``skip`` trains on the good rows and reports the same list.
        num_workers: DataLoader worker processes.
        format: ``auto`` (detected from the first rows), ``standard``, ``conversational``, ``implicit``,
            ``sharegpt``, ``alpaca``, ``ratings`` or ``unpaired`` (see :mod:`prefmodule.data.formats`).
        columns: the dataset's column names for ours, e.g. ``{question: prompt, kto_tag: label}``.
        chat_template: Jinja chat template instead of the tokenizer's: the template itself, or a file holding it.
        max_prompt_length: most prompt tokens; a longer prompt is cut as ``truncation_mode`` says.
        truncation_mode: which end of a long prompt is kept: ``keep_end`` (the turn nearest the response; BOS
            stays first) or ``keep_start``.
        group_by_length: batch pairs of similar length together (less padding); still shuffled every epoch.
        padding_free: pack each batch into one row without padding (``position_ids`` restart per sequence);
            same log-probs as padded batches, less compute and memory. ``None`` (default): pack when the
            connected objective's models attend to packed rows per sequence (``sdpa`` and flash-attention
            models), else pad.
        pad_to_multiple_of: round the padded width up to a multiple of this.
        cache_dir: where tokenised data is cached (default ``~/.cache/prefmodule/data``), keyed by the data's
            content, the tokenizer and these settings.
        tags: ShareGPT key and role names, LLaMA-Factory's ``tags`` (``{role_tag: from, user_tag: human, ...}``).
        pairs_from_ratings: how rated completions become a pair: ``best_worst`` or ``best_random``.
        unpaired: batches of unpaired rows (True) or pairs (False); default: the connected objective's.
        kl_completions: unpaired rows carry KL completions; default: the connected objective's.
        tokenize_workers: threads tokenising in parallel (default: the usable cores, at most 8).
    """

    def __init__(
        self,
        train: DataSpec = None,
        val: DataSpec = None,
        test: DataSpec = None,
        predict: DataSpec = None,
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
        tags: dict[str, str] | None = None,
        pairs_from_ratings: PairsFromRatings = "best_worst",
        unpaired: bool | None = None,
        kl_completions: bool | None = None,
        tokenize_workers: int | None = None,
    ):
        super().__init__()
        self.save_hyperparameters(ignore=["tokenizer"] if isinstance(tokenizer, PreTrainedTokenizerBase) else None)
        self.groups = check_arguments(self.hparams, tokenizer)
        self.tokenizer = tokenizer
        self.batch_format: BatchFormat | None = None  # what the connected objective needs
        self.datasets: dict[str, PairDataset | UnpairedDataset | list] = {}
        self._loaded: dict[str, Table] = {}  # by cache key: each source is read and reported once

    # ----- the objective's needs ----------------------------------------------------------------------------
    def connect(self, batch_format: BatchFormat) -> Connection:
        """Take what the objective being trained needs (its tokenizer, pairs or unpaired rows, KL completions,
        packed batches), before ``prepare_data`` and ``setup``; this datamodule's own settings of the same take
        precedence. Answers with the chat template conversations are rendered with when ``chat_template`` is set
        (``None``: the tokenizer's own), which the export saves with the tokenizer, and how to build the collator
        of its batches. Datasets built for another format are built again."""
        if batch_format != self.batch_format:
            self.datasets.clear()
        self.batch_format = batch_format
        return Connection(self.chat_template(), self.collator)

    def collator(self) -> PreferenceCollator:
        """How items become batches: padded, or packed (:meth:`packs`), with the tokenizer's pad id."""
        return PreferenceCollator(self.get_tokenizer().pad_token_id, self.hparams.pad_to_multiple_of, self.packs())

    def get_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: the ``tokenizer`` setting, else the connected objective's."""
        if isinstance(self.tokenizer, str):
            self.tokenizer = load_tokenizer(self.tokenizer)
        if self.tokenizer is not None:
            return self.tokenizer
        if self.batch_format is None:
            raise ConfigError("PreferenceDataModule needs a tokenizer: connect it to the objective being trained "
                              "before Lightning runs it (`trainer.fit(module, datamodule=module.connect(data))`; the "
                              "CLI connects them), or pass `tokenizer=` to use the data alone.")
        return self.batch_format.tokenizer

    def unpaired(self) -> bool:
        """Whether items are unpaired rows: ``unpaired``, or when unset, the connected objective's."""
        return self._setting("unpaired", "unpaired")

    def kl_completions(self) -> bool:
        return self._setting("kl_completions", "kl_completions")

    def packs(self) -> bool:
        """Whether batches are packed: ``padding_free``, or when unset, what the connected objective's models allow
        (asked now: they are placed once the loaders are built)."""
        own = self.hparams.padding_free
        return own if own is not None else bool(self._packing())

    def _packing(self):
        """Whether the connected objective's models attend to packed rows per sequence (with ``reason`` when not);
        ``None`` without a connection, or for an objective that asks for padded batches."""
        packing = self.batch_format.packing if self.batch_format is not None else None
        return packing() if packing is not None else None

    def _setting(self, name: str, need: str) -> bool:
        own = self.hparams[name]
        return own if own is not None else bool(self.batch_format is not None and getattr(self.batch_format, need))

    # ----- Lightning hooks ---------------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Read, validate, tokenise and cache the data of the current stage, once per node, before ``setup``."""
        if self.trainer is not None and self.trainer.state.fn is not None:
            self._prepare(SPLITS_OF_STAGE[self.trainer.state.fn.value])

    def setup(self, stage: str) -> None:
        for split in SPLITS_OF_STAGE[stage]:
            self.datasets[split] = self._dataset(split, optional=stage == "fit" and split == "val")

    def _check_packing(self) -> None:
        """``padding_free: true`` that the objective's models cannot honour is a settings error."""
        packing = self._packing()
        if self.hparams.padding_free and packing is not None and not packing:
            raise ConfigError(f"data.padding_free=true: {self.batch_format.objective} cannot attend to packed rows "
                              f"per sequence ({packing.reason}); packed rows would need Hugging Face's "
                              "block-diagonal mask, quadratic in tokens. Leave data.padding_free unset (padded "
                              "batches) or use model.attn_implementation: sdpa.")

    def _say_why_padded(self, train) -> None:
        """One line when batches are padded because the objective's models cannot take packed rows: why, and (for
        pairs and rows) the share of padding it costs on the training data, at least."""
        packing = self._packing()
        if packing is None or packing or self.hparams.padding_free is False:
            return
        reason = packing.reason
        cost = "time and memory that packing would save"
        if isinstance(train, (PairDataset, UnpairedDataset)):
            lengths = np.asarray(train.lengths(), dtype=np.float64)  # a pair's longer sequence; a row's own
            size = self.hparams.batch_size
            batches = np.array_split(lengths, max(1, -(-len(lengths) // size)))
            padded = sum(len(batch) * batch.max() for batch in batches if len(batch))
            cost = (f"padding takes at least {1 - lengths.sum() / padded:.0%} of the tokens of train's batches of "
                    f"{size} (in data order), " + cost)
        rank_zero_info(f"prefmodule data: batches padded, not packed: {reason}; {cost}")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val") if self._split("val", optional=True) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def _split(self, split: str, optional: bool = False) -> PairDataset | UnpairedDataset | list:
        """The split's dataset: as ``setup`` built it, or built now (the datamodule used without a trainer)."""
        if split not in self.datasets:
            self.datasets[split] = self._dataset(split, optional=optional)
        return self.datasets[split]

    def _prepare(self, splits) -> None:
        if self.prompts():  # read in memory when the dataset is built
            return
        for split in splits:
            if found := self._data_of(split):
                self._tables(*found, self._items_unpaired(*found, split))

    # ----- data --------------------------------------------------------------------------------------------
    def _data_of(self, split: str) -> tuple[list[SourceGroup], str] | None:
        """What ``split`` is read from: ``(groups, "train")`` when it is (part of) the training data."""
        groups = self.groups
        data = {"train": groups["train"], "val": groups["val"], "test": groups["test"] or groups["val"],
                "predict": groups["predict"] or groups["val"]}[split]
        if data:
            return data, split
        if split != "train" and self._holds_out():
            return groups["train"], "train"
        return None

    def input_files(self) -> list[str]:
        """The local files the splits read (globs expanded; a split whose files are missing left out): what an
        output of the same run must not overwrite."""
        files = []
        for split, groups in self.groups.items():
            for group in groups:
                try:
                    files += [source.path for source in find_sources(list(group.names), split)
                              if isinstance(source, FileSource)]
                except UserError:  # a split this stage does not read
                    continue
        return files

    def _holds_out(self) -> bool:
        return self.hparams.val_fraction > 0 and not self.groups["val"] and bool(self.groups["train"])

    def _dataset(self, split: str, optional: bool = False) -> PairDataset | UnpairedDataset | list:
        hp = self.hparams
        found = self._data_of(split)
        if found is None:
            if optional:
                return []
            if split == "train":
                raise ConfigError("`fit` needs training data: set `data.train`.")
            raise ConfigError(f"no {split} data: set `data.{split}`" + ("" if split == "val" else " or `data.val`")
                              + " (or `data.val_fraction` with `data.train`)")
        dataset = self._prompts(*found) if self.prompts() else self._assemble(*found, split)
        if found[1] == "train" and self._holds_out():
            kept, held = holdout(dataset, hp.val_fraction, hp.seed)
            if split == "train":
                rank_zero_info(f"prefmodule data: {len(held)} items of train held out for validation "
                               f"(val_fraction={hp.val_fraction}, seed={hp.seed}), {len(kept)} left to train on")
            dataset = dataset.select(kept if split == "train" else held)
            if not len(dataset):
                raise DataError(f"{split}: no item left after holding out val_fraction={hp.val_fraction} of train "
                                f"({len(kept) + len(held)} items)")
        if isinstance(dataset, UnpairedDataset) and self.kl_completions():
            dataset = self._with_kl_chunks(dataset, split)
        return dataset

    def _prompts(self, groups: list[SourceGroup], kind: str) -> PromptDataset:
        """The prompts of ``groups``, read, checked and tokenised in memory, with a summary line per group."""
        hp, tokenizer = self.hparams, self.get_tokenizer()
        lists = []
        for group in groups:
            options = group.settings(self._settings_defaults())
            settings = Settings(**options, max_length=hp.max_length, max_prompt_length=hp.max_prompt_length,
                                truncation_mode=hp.truncation_mode)
            sources = find_sources(list(group.names), "train" if kind == "train" else "test")
            items, meta = prompt_items(sources, settings, Encoder(tokenizer, self.chat_template()), group.label,
                                       hp.on_bad_rows)
            if not items:
                raise DataError(f"{kind}: no usable prompt in {group.label} ({meta['rows']} read"
                                f"{_reasons(Counter(meta['dropped']))})")
            lengths = np.array([len(item["prompt_ids"]) for item in items])
            rank_zero_info(f"prefmodule data: {kind} <- {group.label} ({meta['format']} format): {meta['rows']} rows "
                           f"read, {len(items)} prompts kept{_reasons(Counter(meta['dropped']))}; tokens per prompt "
                           f"{_spread(lengths)}")
            lists.append(items)
        return PromptDataset(lists)

    def prompts(self) -> bool:
        """Whether items are prompts alone, to complete: what the connected objective asks for."""
        return self.batch_format is not None and self.batch_format.prompts

    def _assemble(self, groups: list[SourceGroup], kind: str, split: str) -> PairDataset | UnpairedDataset:
        """The split's dataset over its groups' tables, with row numbers running across groups."""
        unpaired = self._items_unpaired(groups, kind, split)
        tables = self._tables(groups, kind, unpaired)
        rows = np.cumsum([0] + [t.split_rows for t in tables])
        tables = [Table(t.arrays, int(offset), int(rows[-1])) for t, offset in zip(tables, rows)]
        if unpaired:
            return UnpairedDataset(tables, max_length=self.hparams.max_length)
        return PairDataset(tables)

    def _items_unpaired(self, groups: list[SourceGroup], kind: str, split: str) -> bool:
        """Unpaired items for an unpaired objective; on ``predict``, for an objective that takes either (KTO, a
        reward model), items as the data holds them: a file of pairs stays pairs (which answer does the model
        prefer?), a file of rows stays rows."""
        either = self.unpaired() or (self.batch_format is not None and self.batch_format.predicts_either)
        if split == "predict" and either:
            return self._unpaired_data(groups, kind)
        return self.unpaired()

    def _unpaired_data(self, groups: list[SourceGroup], kind: str) -> bool:
        """Whether ``groups`` hold unpaired rows (a predict file of pairs stays pairs for an unpaired module)."""
        found = set()
        for group in groups:
            settings = group.settings(self._settings_defaults())
            rows = [row for source in find_sources(list(group.names), kind)
                    for _, row in itertools.islice(source.rows(), DETECTION_ROWS)]
            checker = make_checker(rows, settings["format"], settings["columns"], settings["tags"])
            found.add(checker.unpaired)
        if len(found) > 1:
            raise ConfigError("data.predict: mixes paired and unpaired sources; predict on one kind at a time")
        return found.pop()

    def _settings_defaults(self) -> dict:
        hp = self.hparams
        return {"format": hp.format, "columns": hp.columns, "tags": hp.tags, "pairs_from_ratings": hp.pairs_from_ratings}

    def _tables(self, groups: list[SourceGroup], kind: str, unpaired: bool) -> list[Table]:
        return [self._table(group, kind, unpaired) for group in groups]

    def _table(self, group: SourceGroup, kind: str, unpaired: bool) -> Table:
        """One group's tokenised items: from the cache, or read, validated, tokenised and cached."""
        hp = self.hparams
        tokenizer = self.get_tokenizer()
        sources = find_sources(list(group.names), "train" if kind == "train" else "test")
        chat_template = self.chat_template()
        options = group.settings(self._settings_defaults())
        seed = hp.seed if options["pairs_from_ratings"] == "best_random" else 0  # only a random draw depends on it
        settings = Settings(**options, seed=seed, max_length=hp.max_length,
                            max_prompt_length=hp.max_prompt_length, truncation_mode=hp.truncation_mode,
                            unpaired=unpaired)
        key = cache.cache_key(sources=[source.fingerprint() for source in sources],
                              tokenizer=tokenizer_fingerprint(tokenizer, chat_template), **vars(settings))
        if key in self._loaded:
            return self._loaded[key]
        cache_dir = hp.cache_dir or DEFAULT_CACHE_DIR
        found = cache.load(cache_dir, key)
        if isinstance(found, tuple):
            arrays, meta = found
            status = f"cache hit: {Path(cache_dir).expanduser() / key}"
        else:
            if found != "miss":
                rank_zero_warn(f"prefmodule data: cached {group.label} data {found}; tokenising again")
            arrays, meta, status = self._tokenize(sources, settings, Encoder(tokenizer, chat_template), group.label,
                                                  cache_dir, key)
        table = Table(arrays, 0, meta["rows"])
        self._report(kind, group, meta, table, unpaired, status)
        self._loaded[key] = table
        return table

    def _tokenize(self, sources, settings: Settings, encoder: Encoder, label: str, cache_dir: str, key: str):
        """Stream the rows into a new cache entry; where it cannot be written, into memory for this run."""
        hp = self.hparams
        objective = self.batch_format.objective if self.batch_format is not None else "a paired objective"

        def run(columns):
            try:
                meta = prepare(sources, settings, encoder, columns, label, hp.on_bad_rows, hp.tokenize_workers,
                               objective)
                return columns.finish(meta), meta
            except BaseException:
                columns.abort()
                raise

        try:
            arrays, meta = run(cache.EntryWriter(cache_dir, key, "the data cache"))
            return arrays, meta, f"cache miss, saved to {Path(cache_dir).expanduser() / key}"
        except cache.CacheWriteError as error:
            rank_zero_warn(f"prefmodule data: {error}; tokenising {label} into memory for this run (set "
                           "`data.cache_dir` to a writable folder with space to keep it)")
            arrays, meta = run(cache.MemoryColumns())
            return arrays, meta, f"cache miss, not saved ({error})"

    def _report(self, kind: str, group: SourceGroup, meta: dict, table: Table, unpaired: bool, status: str) -> None:
        """The start summary of a source group; raises on bad rows stored in a cache entry when ``on_bad_rows``
        is ``error``."""
        bad = [BadRow(**b) for b in meta["bad"]]
        if bad and self.hparams.on_bad_rows == "error":
            raise DataValidationError(bad, meta["rows"], meta["bad_count"])
        if not len(table):
            raise DataError(f"{kind}: no usable row in {group.label} ({meta['rows']} read"
                            f"{_reasons(Counter(meta['dropped']))}; max_length={self.hparams.max_length}, "
                            f"max_prompt_length={self.hparams.max_prompt_length})")
        dataset = UnpairedDataset(table, max_length=self.hparams.max_length) if unpaired else PairDataset(table)
        weight = f", weight {group.weight:g}" if group.weight is not None else ""
        if unpaired and not meta["format"].startswith("unpaired"):
            weight += ", each pair as two unpaired rows"
        if unpaired:
            desirable = int(dataset.labels().sum())
            kept = (f"{len(table)} unpaired rows kept ({desirable} desirable, {len(table) - desirable} undesirable)"
                    f"{_reasons(Counter(meta['dropped']))}; tokens per row (prompt + completion)")
        else:
            kept = f"{len(table)} pairs kept{_reasons(Counter(meta['dropped']))}; tokens per pair (prompt + longer response)"
        rank_zero_info(f"prefmodule data: {kind} <- {group.label} ({meta['format']} format{weight}): {meta['rows']} "
                       f"rows read, {kept} {_spread(dataset.lengths())}; {status}")
        if bad:
            rank_zero_info(f"prefmodule data: skipped {meta['bad_count']} bad rows of {kind}:\n  "
                           f"{describe(bad, meta['bad_count'])}")

    def chat_template(self) -> str | None:
        """The ``chat_template`` setting as Jinja text: given inline, or read from the file it names."""
        template = self.hparams.chat_template
        if template is None or "{{" in template or "{%" in template:
            return template
        return Path(resolve(template)).read_text()

    def _with_kl_chunks(self, dataset: UnpairedDataset, split: str) -> UnpairedDataset:
        """KL partners fixed now (so a precomputed reference pass scores them): training chunks of ``batch_size``
        over a seeded permutation of each weighted source group (of all rows without weights), evaluation chunks
        of ``eval_batch_size`` in file order."""
        hp = self.hparams
        if split != "train":
            size = hp.eval_batch_size or hp.batch_size
            return dataset.with_kl_chunks(np.arange(len(dataset)), chunk_sizes(len(dataset), size))
        sizes = dataset.group_sizes() if self._weights("train") is not None else [len(dataset)]
        lengths = dataset.lengths() if hp.group_by_length else None
        return dataset.with_kl_chunks(*kl_chunks(sizes, hp.batch_size, hp.seed, lengths))

    def _weights(self, split: str) -> list[float] | None:
        groups = self.groups["train"] if split == "train" else []
        return [g.weight for g in groups] if groups and groups[0].weight is not None else None

    def _loader(self, split: str) -> DataLoader:
        hp = self.hparams
        dataset = self._split(split)
        size = hp.batch_size if split == "train" else (hp.eval_batch_size or hp.batch_size)
        shard = (self.trainer.distributed_sampler_kwargs if self.trainer is not None else None) or {}
        ranks = dict(num_replicas=shard.get("num_replicas", 1), rank=shard.get("rank", 0))
        weights = self._weights(split) if split == "train" else None
        if getattr(dataset, "chunk_sizes", None) is not None:
            mixture = Mixture(dataset.chunks_per_group, weights) if weights else None
            batches = ChunkBatchSampler(EpochSampler(dataset), dataset.chunk_sizes, shuffle=split == "train",
                                        seed=hp.seed, mixture=mixture, **ranks)
        else:
            mixture = Mixture(dataset.group_sizes(), weights) if weights else None
            repeats = self.batch_format.repeats if split == "train" and self.batch_format is not None else 1
            window = self.trainer.accumulate_grad_batches if self.trainer is not None else 1
            batches = PairBatchSampler(EpochSampler(dataset), size, lengths=dataset.lengths() if hp.group_by_length
                                       else None, shuffle=split == "train", seed=hp.seed, mixture=mixture,
                                       repeats=repeats, window=window, **ranks)
        if mixture is not None and split == "train":
            self._report_mixture(mixture)
        self._check_packing()
        if split == "train":
            self._say_why_padded(dataset)
        return ResumableLoader(
            dataset, batch_sampler=batches, num_workers=hp.num_workers,
            collate_fn=self.collator(),
            persistent_workers=hp.num_workers > 0,
        )

    def _report_mixture(self, mixture: Mixture) -> None:
        parts = [f"{group.label} {quota} of {size} (weight {group.weight:g}"
                 + (f", {quota / size:.1f} passes)" if size and quota > size else ")")
                 for group, quota, size in zip(self.groups["train"], mixture.quotas(), mixture.sizes)]
        unit = "batches" if self.kl_completions() and self.unpaired() else "items"
        rank_zero_info(f"prefmodule data: train mixture, {unit} per epoch: " + "; ".join(parts))


# ----- helpers ----------------------------------------------------------------------------------------------
def holdout(dataset, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` positions: a seeded share of the dataset's source rows (both rows of a pair split
    into unpaired rows land on the same side)."""
    rows = dataset.column("index")
    if isinstance(dataset, UnpairedDataset):  # a pair's rejected row has index = rows read + its row
        read = dataset.tables[0].split_rows
        rows = np.where(rows >= read, rows - read, rows)
    unique, owner = np.unique(rows, return_inverse=True)
    _, held_rows = split_positions(len(unique), fraction, seed)
    held = np.isin(owner, held_rows)
    return np.flatnonzero(~held), np.flatnonzero(held)


def split_positions(count: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of ``range(count)`` into ``(kept, held_out)``, ``round(fraction * count)`` held out (at least 1)."""
    order = np.random.default_rng(seed).permutation(count)
    held = max(1, round(fraction * count))
    return np.sort(order[held:]), np.sort(order[:held])


def _spread(lengths: np.ndarray) -> str:
    """``p50=.. p90=.. p99=.. max=..`` of token lengths, for the start summary."""
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99]).round().astype(int)
    return f"p50={p50} p90={p90} p99={p99} max={lengths.max()}"


def _reasons(dropped: Counter) -> str:
    if not dropped:
        return ""
    return f", {sum(dropped.values())} dropped ({', '.join(f'{n} {reason}' for reason, n in dropped.most_common())})"
