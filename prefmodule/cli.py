"""``python -m prefmodule {fit,validate,test,predict}``: Lightning's CLI over the prefmodule modules;
``python -m prefmodule report <log dir>``: a run's report."""

from __future__ import annotations

import os
import signal
import sys

import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from prefmodule.data import PreferenceDataModule
from prefmodule.errors import find_user_error, message, show_traceback
from prefmodule.objectives import PreferenceModule
from prefmodule.training.cli import PrefCLI


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
            print(f"prefmodule: error: {message(error)}", file=sys.stderr)
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


def console() -> None:
    """The installed ``prefmodule`` command: exit code 0 on success (``main``'s return value is for Python)."""
    main()
