"""A full disk or a folder without write permission, met while writing a checkpoint or the Hugging Face
export: one message naming the path, exit code 2, and the earlier checkpoint still loads.

The disk is a small tmpfs where this machine lets us mount one (root), else a file-size limit
(``RLIMIT_FSIZE``); the read-only folder is a read-only bind mount as root, else a folder without write
permission."""

import contextlib
import os
import resource
import signal
import subprocess
from pathlib import Path

import lightning as L
import pytest
import torch

from prefmodule.training.checkpoints import newest_checkpoint
from prefmodule.cli import main

CONFIGS = Path(__file__).parent.parent / "configs"


def mount(*args: str) -> bool:
    return os.geteuid() == 0 and subprocess.run(["mount", *args], capture_output=True).returncode == 0


@contextlib.contextmanager
def small_disk(path: Path):
    """A 16 MB tmpfs at ``path`` where mounting is allowed; otherwise just the folder (see :class:`FillDisk`)."""
    path.mkdir()
    mounted = mount("-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path))
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=True)


def exhaust_space(path: str, tmpfs: bool, file_size_limit: int) -> None:
    """Fill the disk under ``path`` (a tmpfs), or cap the size of any file this process writes at
    ``file_size_limit`` bytes (no tmpfs): either way the next big write fails."""
    if tmpfs:
        with open(os.path.join(path, "filler"), "wb") as handle, contextlib.suppress(OSError):
            while True:
                handle.write(b"\0" * 65536)
                handle.flush()
    else:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


class FillDisk(L.Callback):
    """At optimizer step ``step``, fills the disk under ``path`` (a tmpfs), or caps the size of any file this
    process writes (no tmpfs) so that nothing bigger than what is written already fits."""

    def __init__(self, path: str, step: int, tmpfs: bool):
        self.path, self.step, self.tmpfs = path, step, tmpfs

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            exhaust_space(self.path, self.tmpfs, 1 << 20)


class ReadOnlyRunFolder(L.Callback):
    """When fit ends (after its last checkpoint, before the export), makes the run's log folder read-only."""

    def on_fit_end(self, trainer, pl_module):
        folder = trainer.log_dir
        if not (mount("--bind", folder, folder) and mount("-o", "remount,bind,ro", folder)):
            os.chmod(folder, 0o555)


def fit_args(root, train, *extra):
    return ["fit", "--config", str(CONFIGS / "orpo.yaml"), f"--trainer.default_root_dir={root}",
            f"--data.train={train}",
            "--data.batch_size=4", "--trainer.max_steps=4", "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false", "--trainer.callbacks+=prefmodule.training.checkpoints.RunCheckpoint",
            "--trainer.callbacks.every_steps=2", *extra]


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("prefmodule: error: ")]
    return line


def test_disk_full_while_writing_a_checkpoint_then_a_read_only_folder_for_the_export(tmp_path, small_data, capsys,
                                                                                     caplog):
    disk = tmp_path / "disk"
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    with small_disk(disk) as tmpfs:
        try:
            with pytest.raises(SystemExit) as exit_:
                main(fit_args(disk, small_data[0], "--trainer.callbacks+=test_disk.FillDisk",
                              f"--trainer.callbacks.path={disk}", "--trainer.callbacks.step=3",
                              f"--trainer.callbacks.tmpfs={tmpfs}"))
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limit)
            signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        checkpoints = disk / "lightning_logs" / "version_0" / "checkpoints"
        reason = ("No space left on device; free space on that disk, or write elsewhere" if tmpfs else
                  "File too large; the file exceeds the size limit for this process")
        assert exit_.value.code == 2
        assert error_line(capsys).startswith(
            f"prefmodule: error: could not write a checkpoint to {checkpoints / 'epoch=0-step=4.ckpt'}: {reason}")
        assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=2.ckpt", "last.ckpt"]  # no torn file
        assert newest_checkpoint(disk) == checkpoints / "epoch=0-step=2.ckpt"

        # Space freed, the earlier checkpoint resumes; this time the run's folder turns read-only before the export.
        (disk / "filler").unlink(missing_ok=True)
        resumed = disk / "lightning_logs" / "version_1"
        try:
            with pytest.raises(SystemExit) as exit_:
                main(fit_args(disk, small_data[0], "--ckpt_path=last",
                              "--trainer.callbacks+=test_disk.ReadOnlyRunFolder"))
            line = error_line(capsys)
        finally:
            subprocess.run(["umount", str(resumed)], capture_output=True)
            os.chmod(resumed, 0o755)
        assert f"resuming {checkpoints / 'epoch=0-step=2.ckpt'}: global step 2" in caplog.text
        assert exit_.value.code == 2
        assert line.startswith("prefmodule: error: could not write the Hugging Face export to "
                               f"{resumed / 'hf_model'}: ")
        assert line.endswith(("Read-only file system; that file system is read-only: write elsewhere (e.g. "
                              "`--trainer.default_root_dir`).", "Permission denied; you lack permission to write "
                              "there: change the folder's permissions, or write elsewhere."))
        assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
