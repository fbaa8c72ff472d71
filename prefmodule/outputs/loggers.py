"""What prefmodule knows about Lightning's loggers: the CSV logger every CLI run keeps, where each logger
writes, and how each one takes the table of generated samples."""

from __future__ import annotations

import logging
import os

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

SAMPLE_COLUMNS = ("step", "prompt", "completion", "reward", "chosen", "rejected")


def with_csv(loggers: list[Logger], root: str) -> list[Logger]:
    """``loggers`` led by a CSV logger (added if missing). The first logger names the run's folder (its
    ``metrics.csv``, checkpoints, samples, report, HF export); next to TensorBoard, the CSV goes into its folder."""
    csv = [logger for logger in loggers if isinstance(logger, CSVLogger)]
    others = [logger for logger in loggers if not isinstance(logger, CSVLogger)]
    if not csv:
        tensorboard = next((logger for logger in others if isinstance(logger, TensorBoardLogger)), None)
        where = dict(save_dir=tensorboard.save_dir, name=tensorboard.name, version=tensorboard.version) \
            if tensorboard is not None else dict(save_dir=root)
        csv = [CSVLogger(**where)]
    return csv + others


def log_dir(trainer: Trainer) -> str:
    """The run's folder (metrics, samples, report, HF export): the first logger's version folder, where
    Lightning's ``ModelCheckpoint`` puts ``checkpoints/`` too; ``default_root_dir`` without a logger.

    Call it on every rank (the path is broadcast from rank 0).
    """
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    if isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return trainer.log_dir
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return trainer.strategy.broadcast(os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name), version))


def metrics_location(logger: Logger) -> str:
    """Where ``logger`` wrote this run's metrics: a file, a folder or a tracking URI."""
    if isinstance(logger, CSVLogger):
        return os.path.join(logger.log_dir, "metrics.csv")
    if isinstance(logger, TensorBoardLogger):
        return logger.log_dir
    if isinstance(logger, MLFlowLogger):
        if logger.save_dir is not None:  # the local file store: <save_dir>/<experiment id>/<run id>
            return os.path.join(logger.save_dir, logger.experiment_id, logger.run_id)
        return f"{logger.experiment.tracking_uri} (run {logger.run_id})"
    if isinstance(logger, WandbLogger):
        run = logger.experiment
        return run.url or os.path.dirname(run.dir)  # offline: the run's folder, for `wandb sync`
    return f"{type(logger).__name__} (run {logger.version})"


def log_samples_table(logger: Logger, rows: list[dict], step: int, samples_file: str) -> None:
    """Show the samples of ``step`` where ``logger`` takes tables: TensorBoard text (a Markdown table), a W&B
    Table, an MLflow artifact (the whole ``samples.jsonl``). Other loggers have ``samples.jsonl`` in the run folder."""
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text("samples", markdown_table(rows), global_step=step)
    elif isinstance(logger, WandbLogger):
        logger.log_table("samples", columns=list(SAMPLE_COLUMNS), data=[[row[c] for c in SAMPLE_COLUMNS] for row in rows],
                         step=step)
    elif isinstance(logger, MLFlowLogger):
        logger.experiment.log_artifact(logger.run_id, samples_file)


def markdown_table(rows: list[dict]) -> str:
    def cell(value) -> str:
        text = "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(SAMPLE_COLUMNS) + " |", "|" + "---|" * len(SAMPLE_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[c]) for c in SAMPLE_COLUMNS) + " |" for row in rows]
    return "\n".join(lines)


def silence_lightning_tips() -> None:
    """Drop Lightning's promotional "💡 Tip: ..." lines (litlogger, litmodels) from its rank-zero log."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(lambda record: not str(record.msg).startswith("💡 Tip"))
