"""``python -m prefmodule {fit,validate,test,predict}``: Lightning's CLI over the prefmodule modules;
``python -m prefmodule report <log dir>``: a run's report."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from prefmodule.training.checkpoints import resolve_checkpoint
from prefmodule.data import PreferenceDataModule
from prefmodule.errors import ConfigError, find_user_error, show_traceback
from prefmodule.outputs.loggers import with_csv
from prefmodule.objectives import PreferenceModule


class PrefCLI(LightningCLI):
    """Any :class:`PreferenceModule` subclass as ``model`` (``--model=prefmodule.DPOModule``) and the
    one fixed :class:`PreferenceDataModule` as ``data`` (``--data.train=...``).

    Metrics always go to ``<default_root_dir>/lightning_logs/version_N/metrics.csv`` (the run's folder), also
    with other loggers (``--trainer.logger=WandbLogger``, ...), unless ``--trainer.logger=false``.
    ``--ckpt_path=last`` resumes from the newest complete checkpoint under ``default_root_dir``; checkpoints
    load with ``weights_only=True`` (no code in them runs) unless ``--weights_only=false``.
    """

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if "weights_only" in self._subcommand_method_arguments[subcommand]:
            parser.set_defaults(weights_only=True)
        return parser

    def _parse_ckpt_path(self) -> None:
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            root = config.trainer.get("default_root_dir") or os.getcwd()
            config.ckpt_path = resolve_checkpoint(config.get("ckpt_path"), root)
        super()._parse_ckpt_path()  # lays the checkpoint's hyperparameters over the configuration

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
        return super()._instantiate_trainer(config, callbacks)


def main(args: list[str] | None = None) -> PrefCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``); returns the CLI object (with ``.trainer``, ``.model``).

    A configuration or data mistake (:class:`~prefmodule.errors.UserError`), here or inside ``fit`` on any
    rank, prints one message and exits with its code (2; 3 when training diverged); ``--traceback`` or
    ``PREFMODULE_TRACEBACK=1`` shows its traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:  # not a Lightning subcommand (LightningCLI's are fixed)
        from prefmodule.outputs.report import main as report

        return report(argv[1:])
    traceback = show_traceback(argv)
    if "--traceback" in argv:
        argv.remove("--traceback")
    if args is None:
        sys.argv[1:] = argv  # LightningCLI reads sys.argv itself (it warns when given both)
    given = os.environ.get("PREFMODULE_TRACEBACK")
    if traceback:
        os.environ["PREFMODULE_TRACEBACK"] = "1"  # for the ranks Lightning launches with this command line
    try:
        cli = PrefCLI(
            PreferenceModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=args if args is None else argv,
        )
    except SIGTERMException:  # Lightning stops between two steps; the run's checkpoint callback saved that step
        print("prefmodule: stopped by SIGTERM; resume with --ckpt_path=last", file=sys.stderr)
        raise SystemExit(128 + signal.SIGTERM) from None
    except Exception as raised:
        error = find_user_error(raised)
        if error is None or traceback:
            raise
        if rank_zero_only.rank == 0 or not error.on_every_rank:
            print(f"prefmodule: error: {error}", file=sys.stderr)
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        raise SystemExit(error.exit_code) from None
    finally:
        if given is None:
            os.environ.pop("PREFMODULE_TRACEBACK", None)
    if torch.distributed.is_initialized():  # Lightning leaves gloo's open: its threads would abort the exit
        torch.distributed.barrier()  # every rank done (rank 0 may still be writing the export)
        torch.distributed.destroy_process_group()
    return cli


def _root_cause(error: BaseException) -> BaseException:
    while error.__cause__ is not None:
        error = error.__cause__
    return error


def console() -> None:
    """The installed ``prefmodule`` command: exit code 0 on success (``main``'s return value is for Python)."""
    main()
