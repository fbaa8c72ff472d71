"""``python -m prefmodule {fit,validate,test,predict}``: Lightning's CLI over the prefmodule modules;
``python -m prefmodule report <log dir>``: a run's report."""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI

from prefmodule.data import PreferenceDataModule
from prefmodule.errors import UserError, show_traceback
from prefmodule.loggers import with_csv
from prefmodule.modules import PreferenceModule


class PrefCLI(LightningCLI):
    """Any :class:`PreferenceModule` subclass as ``model`` (``--model=prefmodule.DPOModule``) and the
    one fixed :class:`PreferenceDataModule` as ``data`` (``--data.train=...``).

    Metrics always go to ``<default_root_dir>/lightning_logs/version_N/metrics.csv`` (the run's folder), also
    with other loggers (``--trainer.logger=WandbLogger``, ...), unless ``--trainer.logger=false``.
    """

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        logger = config.get("logger")
        if logger is not False:
            loggers = [] if logger in (None, True) else list(logger) if isinstance(logger, (list, tuple)) else [logger]
            config["logger"] = with_csv(loggers, config.get("default_root_dir") or os.getcwd())
        return super()._instantiate_trainer(config, callbacks)


def main(args: list[str] | None = None) -> PrefCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``); returns the CLI object (with ``.trainer``, ``.model``).

    A configuration or data mistake (:class:`~prefmodule.errors.UserError`) prints one message and exits
    with code 2; ``--traceback`` or ``PREFMODULE_TRACEBACK=1`` shows its traceback instead.
    """
    argv = list(sys.argv[1:] if args is None else args)
    if argv[:1] == ["report"]:  # not a Lightning subcommand (LightningCLI's are fixed)
        from prefmodule.report import main as report

        return report(argv[1:])
    traceback = show_traceback(argv)
    if "--traceback" in argv:
        argv.remove("--traceback")
    try:
        cli = PrefCLI(
            PreferenceModule,
            PreferenceDataModule,
            subclass_mode_model=True,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
            args=argv,
        )
    except UserError as error:
        if traceback:
            raise
        print(f"prefmodule: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    if torch.distributed.is_initialized():  # Lightning leaves gloo's open: its threads would abort the exit
        torch.distributed.barrier()  # every rank done (rank 0 may still be writing the export)
        torch.distributed.destroy_process_group()
    return cli


def console() -> None:
    """The installed ``prefmodule`` command: exit code 0 on success (``main``'s return value is for Python)."""
    main()
