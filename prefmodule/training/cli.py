"""Lightning's CLI as prefmodule runs it: any objective as ``model``, the one ``PreferenceDataModule`` as ``data``.

Checked on Lightning 2.6: :class:`PrefCLI` overrides ``LightningCLI``'s protected ``_prepare_subcommand_parser``,
``_parse_ckpt_path`` and ``_instantiate_trainer``, and calls Lightning's own via :mod:`prefmodule.private.lightning`.
"""

from __future__ import annotations

import inspect
import os
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from prefmodule.errors import ConfigError, find_user_error
from prefmodule.outputs.loggers import with_csv
from prefmodule.private.lightning import instantiate_trainer, parse_ckpt_path, prepare_subcommand_parser
from prefmodule.training.checkpoints import checkpoint_class, import_class, resolve_checkpoint


class PrefCLI(LightningCLI):
    """Any :class:`PreferenceModule` subclass as ``model`` (``--model=prefmodule.DPOModule``) and the
    one fixed :class:`PreferenceDataModule` as ``data`` (``--data.train=...``).

    Metrics always go to ``<default_root_dir>/lightning_logs/version_N/metrics.csv`` (the run's folder), also
    with other loggers (``--trainer.logger=WandbLogger``, ...), unless ``--trainer.logger=false``.
    ``--ckpt_path=last`` resumes from the newest complete checkpoint under ``default_root_dir``; checkpoints
    load with ``weights_only=True`` (no code in them runs) unless ``--weights_only=false``.
    """

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = prepare_subcommand_parser(self, klass, subcommand, **kwargs)
        if "weights_only" in inspect.signature(getattr(klass, subcommand)).parameters:
            parser.set_defaults(weights_only=True)
        return parser

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            root = config.trainer.get("default_root_dir") or os.getcwd()
            config.ckpt_path = resolve_checkpoint(config.get("ckpt_path"), root)
            check_checkpoint_class(config.ckpt_path, config.get("model"))
        parse_ckpt_path(self)  # lays the checkpoint's hyperparameters over the configuration

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except Exception as error:
            cause = _root_cause(error)
            if find_user_error(error) is None and isinstance(cause, (ValueError, MisconfigurationException)):
                # a constructor refused a value of the configuration (Lightning's Trainer, a transformers class)
                raise ConfigError(str(cause)) from error
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        logger = config.get("logger")
        if logger is not False:
            loggers = [] if logger in (None, True) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
            config["logger"] = with_csv(loggers, config.get("default_root_dir") or os.getcwd())
        return instantiate_trainer(self, config, callbacks)


def check_checkpoint_class(ckpt_path: str | None, model) -> None:
    """Refuse a checkpoint of another objective than the configuration's ``model``: Lightning would lay the
    checkpoint's class over the configuration and run that objective instead, without a word."""
    configured = getattr(model, "class_path", None)
    if not ckpt_path or not configured or not os.path.exists(ckpt_path):
        return
    saved = checkpoint_class(ckpt_path)
    if saved is None or import_class(saved) == import_class(configured):
        return
    name = configured.rpartition(".")[2]
    raise ConfigError(f"ckpt_path={ckpt_path!r} is a checkpoint of {saved}, and the configuration's model is "
                      f"{configured}: a checkpoint resumes or evaluates its own objective. Give a checkpoint of a "
                      f"{name} run, or start {name} from that run's policy with --model.model=<its log dir>/hf_model.")


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error
