"""Lightning's CLI as prefmodule runs it: any objective as ``model``, the one ``PreferenceDataModule`` as ``data``.

Checked on Lightning 2.6: :class:`PrefCLI` overrides ``LightningCLI``'s protected ``_prepare_subcommand_parser``,
``_parse_ckpt_path`` and ``_instantiate_trainer``, and calls Lightning's own via :mod:`prefmodule.private.lightning`.
"""

from __future__ import annotations

import inspect
import os
import sys
from typing import Any

import yaml

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from prefmodule.errors import ConfigError, find_user_error
from prefmodule.outputs.loggers import with_csv
from prefmodule.private.lightning import instantiate_trainer, parse_ckpt_path, prepare_subcommand_parser
from prefmodule.training.callbacks import PredictionWriter, SampleWriter
from prefmodule.training.fit_end import ExportModel, PushToHub
from prefmodule.training.checkpoints import checkpoint_class, import_class, resolve_checkpoint


# What a run leaves behind, each a config group beside ``model`` and ``data`` (a callback): group -> class.
OUTPUT_GROUPS = {"samples": SampleWriter, "export": ExportModel, "push_to_hub": PushToHub,
                 "predictions": PredictionWriter}
# Options the objectives held before those groups existed: old name -> its place now.
MOVED = {"samples": "samples", "export_hf": "export.enabled", "export_merged": "export.merge_adapters",
         "push_to_hub": "push_to_hub", "predictions_path": "predictions.path"}


class PrefCLI(LightningCLI):
    """Any :class:`PreferenceModule` subclass as ``model`` (``--model=prefmodule.DPOModule``), the
    one fixed :class:`PreferenceDataModule` as ``data`` (``--data.train=...``), and beside them what a run leaves
    behind (:data:`OUTPUT_GROUPS`): ``samples``, ``export``, ``push_to_hub`` and ``predictions``. Before every
    subcommand the model connects the datamodule (:meth:`PreferenceModule.connect`), so Lightning's data hooks
    read and tokenise the data as the objective needs it.

    Metrics always go to ``<default_root_dir>/lightning_logs/version_N/metrics.csv`` (the run's folder), also
    with other loggers (``--trainer.logger=WandbLogger``, ...), unless ``--trainer.logger=false``.
    ``--ckpt_path=last`` resumes from the newest complete checkpoint under ``default_root_dir``; checkpoints
    load with ``weights_only=True`` (no code in them runs) unless ``--weights_only=false``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        for group, callback in OUTPUT_GROUPS.items():
            parser.add_lightning_class_args(callback, group)

    def parse_arguments(self, parser: LightningArgumentParser, args) -> None:
        check_moved_settings(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def connect(self) -> None:
        """Tell the datamodule what the objective needs, before Lightning's data hooks run."""
        if self.datamodule is not None and callable(getattr(self.model, "connect", None)):
            self.model.connect(self.datamodule)

    before_fit = before_validate = before_test = before_predict = connect

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


def check_moved_settings(args) -> None:
    """Refuse, in one line, an option that moved from ``model`` to a group of its own (:data:`MOVED`): given on
    the command line (``--model.init_args.export_hf=false``) or in a ``--config`` file."""
    if not isinstance(args, (list, tuple)):
        return
    found = []
    for position, arg in enumerate(args):
        name = str(arg).split("=", 1)[0]
        for prefix in ("--model.init_args.", "--model."):
            if name.startswith(prefix) and name[len(prefix):].split(".")[0] in MOVED:
                found.append((name[len(prefix):].split(".")[0], f"{name} on the command line"))
        if name in ("--config", "-c"):
            path = str(arg).split("=", 1)[1] if "=" in str(arg) else (args[position + 1] if position + 1 < len(args)
                                                                          else None)
            found += [(key, f"model.init_args.{key} in {path}") for key in _model_options(path) if key in MOVED]
    if found:
        old, where = found[0]
        raise ConfigError(f"{where}: `{old}` is no longer a model option; set `{MOVED[old]}` (a group beside model "
                          f"and data: --{MOVED[old]}=... or `{MOVED[old].split('.')[0]}:` at the top of a config)")


def _model_options(path: str | None) -> list[str]:
    """The ``model`` options a YAML config file sets (``model.init_args`` or ``model`` itself)."""
    try:
        with open(path) as handle:
            config = yaml.safe_load(handle)
    except (OSError, TypeError, yaml.YAMLError):
        return []  # the parser reports a missing or malformed file itself
    model = config.get("model") if isinstance(config, dict) else None
    if not isinstance(model, dict):
        return []
    options = model.get("init_args") if isinstance(model.get("init_args"), dict) else model
    return list(options)


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error
