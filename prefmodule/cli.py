"""``python -m prefmodule {fit,validate,test,predict}``: Lightning's CLI over the prefmodule modules."""

from __future__ import annotations

import os
from typing import Any

import torch
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger

from prefmodule.data import PreferenceDataModule
from prefmodule.modules import PreferenceModule


class PrefCLI(LightningCLI):
    """Any :class:`PreferenceModule` subclass as ``model`` (``--model=prefmodule.DPOModule``) and the
    one fixed :class:`PreferenceDataModule` as ``data`` (``--data.train=...``).

    When no logger is configured, metrics go to ``<default_root_dir>/lightning_logs/version_N/metrics.csv``.
    """

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list) -> Any:
        if config.get("logger") in (None, True):
            config["logger"] = CSVLogger(save_dir=config.get("default_root_dir") or os.getcwd())
        return super()._instantiate_trainer(config, callbacks)


def main(args: list[str] | None = None) -> PrefCLI:
    """Run the CLI on ``args`` (default: ``sys.argv``); returns the CLI object (with ``.trainer``, ``.model``)."""
    cli = PrefCLI(
        PreferenceModule,
        PreferenceDataModule,
        subclass_mode_model=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
    )
    if torch.distributed.is_initialized():  # Lightning leaves gloo's open: its threads would abort the exit
        torch.distributed.barrier()  # every rank done (rank 0 may still be writing the export)
        torch.distributed.destroy_process_group()
    return cli
