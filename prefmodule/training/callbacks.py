"""The callbacks every preference module brings (:func:`module_callbacks`), and two of them: generated samples
during ``fit`` (the CLI's ``samples`` group) and the writer of ``predict`` results (``predictions``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, LearningRateMonitor
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from prefmodule.errors import ConfigError, writing
from prefmodule.outputs.loggers import log_dir, log_samples_table
from prefmodule.outputs.samples import SampleSettings, generate_samples, held_out_pairs
from prefmodule.training.checkpoints import default_checkpoints, replacing
from prefmodule.training.fit_end import fit_end_callbacks
from prefmodule.training.guard import default_guard
from prefmodule.training.resume import DataPosition
from prefmodule.training.throughput import Throughput


def module_callbacks(trainer: Trainer | None) -> list[Callback]:
    """A module's callbacks (its ``configure_callbacks``): samples (first: before the clocks start), throughput,
    the data position, what ``fit`` leaves (export and card, report, summary), the ``predict`` writer, the
    learning rate with a logger, and the checkpoints and the non-finite guard unless the trainer has its own.

    The samples, the export and the ``predict`` writer are settings of a run (the CLI's ``samples``, ``export``
    and ``predictions`` groups, or ``Trainer(callbacks=[...])``): the module brings each with its defaults only
    where the trainer has none (a callback a module returns replaces the trainer's of its type)."""
    given = trainer.callbacks if trainer is not None else []
    callbacks = [] if any(isinstance(c, SampleWriter) for c in given) else [SampleWriter()]
    callbacks += [Throughput(), DataPosition(), *fit_end_callbacks(trainer)]
    callbacks += [] if any(isinstance(c, PredictionWriter) for c in given) else [PredictionWriter()]
    if trainer is not None and trainer.loggers:  # Lightning's LearningRateMonitor refuses to run without a logger
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    return callbacks + default_checkpoints(trainer) + default_guard(trainer)


class SampleWriter(Callback):
    """At the start of ``fit`` and at each validation in it, the policy completes a few held-out prompts of
    the validation data: rows appended to ``<log dir>/samples.jsonl`` (``step``, ``index``, ``prompt``, ``message``,
    ``completion``, ``reward``, ``chosen``, ``rejected``), shown as a table by the loggers that take one, and the
    first one printed (a chat prompt by its last user message). Objectives that write no text (reward models)
    have none.

    Generation runs before Lightning's validation starts its clock, so throughput is unaffected.

    Args:
        num_prompts: prompts taken from the validation data, spread evenly over it (the same ones every time);
            0 turns the samples off.
        max_new_tokens: most tokens of a completion.
        temperature: 0 decodes greedily; above 0 samples at that temperature (seeded).
    """

    def __init__(self, num_prompts: int = 4, max_new_tokens: int = 64, temperature: float = 0.0):
        self.settings = SampleSettings(num_prompts, max_new_tokens, temperature)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.write(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and not trainer.sanity_checking:
            self.write(trainer, pl_module)

    def write(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.settings.num_prompts or not pl_module.writes_text:
            return
        if isinstance(trainer.strategy, FSDPStrategy):
            rank_zero_warn("prefmodule: no samples under FSDP1 (its root unit gathers weights only inside a step); "
                           "FSDP2 (configs/strategies/fsdp2.yaml) generates them.")
            return
        pairs = held_out_pairs(trainer, self.settings.num_prompts)
        if not pairs:
            return
        start = time.perf_counter()
        rows = generate_samples(trainer, pl_module, pairs, self.settings)
        path = os.path.join(log_dir(trainer), "samples.jsonl")
        if not trainer.is_global_zero:
            return
        write_jsonl(path, rows, append=True, what="the samples")
        for logger in trainer.loggers:
            log_samples_table(logger, rows, trainer.global_step, path)
        first = rows[0]
        reward = f" (reward {first['reward']:.3f})" if first["reward"] is not None else ""
        rank_zero_info(f"prefmodule: samples at step {trainer.global_step} ({len(rows)} prompts, "
                       f"{time.perf_counter() - start:.1f} s) -> {path} | {_short(first['message'] or first['prompt'])!r} -> "
                       f"{_short(first['completion'])!r}{reward}")


def _short(text: str, width: int = 60) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


class PredictionWriter(BasePredictionWriter):
    """Writes the rows ``predict_step`` returned on every rank (each item once, in dataset order) as JSON lines to
    ``path`` (default ``<log dir>/predictions.jsonl``), and says in one line what was written (:meth:`write`).

    The path is checked before anything is computed (:func:`check_output_path`): when the writer is built, and
    with the default path and the run's data files when ``predict`` sets up; the file is replaced whole.

    Args:
        path: where the rows go (default ``<log dir>/predictions.jsonl``).
    """

    file_name = "predictions.jsonl"  # in the log dir, unless ``path`` is given
    option = "predictions.path"  # the option that sets ``path``, for messages

    def __init__(self, path: str | None = None):
        super().__init__(write_interval="epoch")
        if path is not None:
            check_output_path(path, self.option)
        self.path = path

    def output_path(self, trainer: Trainer) -> str:
        """Where the rows go: ``path``, or the log dir's ``file_name``."""
        return self.path or os.path.join(log_dir(trainer), self.file_name)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict":
            inputs = trainer.datamodule.input_files() if hasattr(trainer.datamodule, "input_files") else []
            check_output_path(self.output_path(trainer), self.option, inputs)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        path = self.output_path(trainer)
        rows = gathered_rows(trainer, predictions)
        if trainer.is_global_zero:
            self.write(rows, path, pl_module)

    def write(self, rows: list[dict], path: str, pl_module: LightningModule) -> None:
        """Write the scored pairs (or rows) and say how many the model prefers chosen in."""
        write_jsonl(path, rows, what="the predictions")
        if rows and "preferred" not in rows[0]:  # unpaired rows: a reward each
            rank_zero_info(f"prefmodule: scored {len(rows)} rows -> {path}")
            return
        preferred = sum(row["preferred"] == "chosen" for row in rows)
        rank_zero_info(f"prefmodule: scored {len(rows)} pairs ({preferred} prefer chosen) -> {path}")


def write_jsonl(path: str, rows: list[dict], append: bool = False, what: str = "JSON lines") -> None:
    """``rows`` as JSON lines in ``path`` (its folder made if missing): appended to it, or replacing it whole (a
    temporary file renamed once written: a failed write leaves the earlier file as it was). A failure to write
    (disk full, no permission) is a :class:`~prefmodule.errors.WriteError` naming ``what`` and the path."""
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    with writing(path, what):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if append:
            with open(path, "a") as handle:
                handle.write(lines)
            return
        with replacing(path) as partial, open(partial, "w") as handle:
            handle.write(lines)


def check_output_path(path: str, option: str, inputs: Iterable[str] = ()) -> None:
    """Refuse, before anything is computed, an output file ``path`` (set by ``option``) that cannot be written: a
    folder, a path under a file, a folder without write permission, or one of the run's ``inputs`` (the data it
    reads: writing would overwrite it)."""
    location = os.path.abspath(path)
    if os.path.isdir(location):
        raise ConfigError(f"{option}={path!r} is a folder: give a file path (e.g. {os.path.join(path, 'out.jsonl')})")
    folder = os.path.dirname(location)
    while not os.path.lexists(folder):  # the nearest existing folder: the missing ones are made
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ConfigError(f"{option}={path!r} lies under {folder}, which is a file: give a path in a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"{option}={path!r}: no permission to write in {folder}; write elsewhere")
    if any(os.path.realpath(location) == os.path.realpath(name) for name in inputs):
        raise ConfigError(f"{option}={path!r} is a data file this run reads: writing it would overwrite that data; "
                          "give another path")


def gathered_rows(trainer: Trainer, predictions: list[list[dict]]) -> list[dict]:
    """The rows ``predict_step`` returned on every rank, each ``index`` once (a distributed sampler repeats a few
    items to even out the ranks), in data order."""
    rows = [row for batch in predictions for row in batch]
    if trainer.world_size > 1:
        gathered = [None] * trainer.world_size
        torch.distributed.all_gather_object(gathered, rows)
        rows = [row for part in gathered for row in part]
    return sorted({row["index"]: row for row in rows}.values(), key=lambda row: row["index"])
