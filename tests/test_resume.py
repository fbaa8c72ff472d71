"""Resume that resumes: a fit killed with SIGKILL (mid-step, while writing a checkpoint, during the export)
and resumed with ``--ckpt_path=last`` ends with the weights of an uninterrupted fit, no step trained twice;
torn, unreadable or code-carrying checkpoints are never used."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors.torch import load_file

from prefmodule.training.checkpoints import PARTIAL, checkpoint_problem, newest_checkpoint, run_checkpoints
from prefmodule.cli import main

from conftest import one_launch_at_a_time

CONFIGS = Path(__file__).parent.parent / "configs"
TESTS = Path(__file__).parent


class KillAt(L.Callback):
    """SIGKILLs its own process at ``point`` of optimizer step ``step`` (1-based): ``mid_step`` (gradients
    computed, weights not yet updated), ``checkpoint`` (the checkpoint written, not yet renamed to its name) or
    ``export`` (the weights exported, the tokenizer not yet). Also appends each trained step to ``log``."""

    def __init__(self, log: str, point: str | None = None, step: int = 0):
        self.steps_file, self.point, self.step = log, point, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if not trainer.is_global_zero:
            return
        with open(self.steps_file, "a") as handle:
            handle.write(json.dumps([trainer.global_step, batch.index.tolist()]) + "\n")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.point == "mid_step" and trainer.global_step + 1 == self.step:
            _kill()

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if self.point == "checkpoint" and trainer.global_step == self.step:
            sys.setprofile(lambda frame, event, fn: event == "c_call" and fn is os.replace and _kill())

    def on_fit_end(self, trainer, pl_module):
        if self.point == "export":  # runs before the export (module callbacks come after the trainer's)
            sys.setprofile(lambda frame, event, fn: event == "call" and frame.f_code.co_name == "save_pretrained"
                           and "tokenization" in frame.f_code.co_filename and _kill())


def _kill():
    os.killpg(0, signal.SIGKILL)  # every rank, as a lost node would (tests start the run in a session of its own)


def fit_args(root, train, *extra):
    """10 steps over 32 pairs in batches of 4 (into the second epoch), a checkpoint every 3 steps."""
    return ["fit", "--config", str(CONFIGS / "orpo.yaml"), f"--trainer.default_root_dir={root}",
            f"--data.train={train}",
            "--data.batch_size=4", "--trainer.max_steps=10", "--trainer.limit_val_batches=0", "--model.lr=1e-3",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            "--trainer.callbacks+=prefmodule.training.checkpoints.RunCheckpoint", "--trainer.callbacks.every_steps=3", *extra]


def steps_of(log: Path) -> list:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, demo_rows):
    from conftest import write_jsonl

    root = tmp_path_factory.mktemp("uninterrupted")
    train = write_jsonl(root / "train.jsonl", demo_rows[:32])
    log = root / "steps.jsonl"
    cli = main(fit_args(root / "run", train, "--trainer.callbacks+=test_resume.KillAt",
                        f"--trainer.callbacks.log={log}"))
    version = Path(cli.trainer.log_dir)
    return train, load_file(version / "hf_model" / "model.safetensors"), steps_of(log), version / "checkpoints"


@pytest.mark.parametrize("point, step, resumed_from", [
    ("checkpoint", 6, 3),  # the step-6 checkpoint never got its name: resume from step 3
    pytest.param("mid_step", 8, 6, marks=pytest.mark.slow),
    pytest.param("export", 10, 10, marks=pytest.mark.slow),  # the step-10 checkpoint is complete: only the export
])
def test_sigkill_then_resume_last_ends_as_if_never_killed(point, step, resumed_from, uninterrupted, tmp_path):
    """The resumed fit runs the installed ``prefmodule`` command, which must exit with 0."""
    train, expected, expected_steps, _ = uninterrupted
    log = tmp_path / "steps.jsonl"
    steps = ["--trainer.callbacks+=test_resume.KillAt", f"--trainer.callbacks.log={log}"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-m", "prefmodule", *fit_args(
        tmp_path, train, *steps, f"--trainer.callbacks.point={point}", f"--trainer.callbacks.step={step}")],
        env=env, capture_output=True, text=True, timeout=600, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    if point == "checkpoint":
        assert (checkpoints / f"epoch=0-step={step}.ckpt{PARTIAL}").is_file()  # written, never renamed
        assert os.readlink(checkpoints / "last.ckpt") == "epoch=0-step=3.ckpt"
    if point == "export":
        exported = tmp_path / "lightning_logs" / "version_0" / "hf_model"
        assert (exported / "model.safetensors").is_file() and not (exported / "tokenizer.json").exists()
    trained_before = len(steps_of(log))

    command = Path(sys.executable).parent / "prefmodule"  # the console script pip installed next to python
    resumed = subprocess.run([str(command), *fit_args(tmp_path, train, "--ckpt_path=last", *steps)], env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"-step={resumed_from}.ckpt: global step {resumed_from}, epoch " in resumed.stderr
    # Steps after the checkpoint were trained again from it, each once more; the resumed fit took up at the next.
    assert steps_of(log)[trained_before:] == expected_steps[resumed_from:]
    assert steps_of(log)[:resumed_from] == expected_steps[:resumed_from]
    version = tmp_path / "lightning_logs" / "version_1"
    assert torch.load(newest_checkpoint(tmp_path), weights_only=True)["global_step"] == 10
    exported = load_file(version / "hf_model" / "model.safetensors")
    for name, weight in expected.items():
        torch.testing.assert_close(exported[name], weight, rtol=0, atol=1e-6, msg=name)
    assert (version / "hf_model" / "tokenizer.json").is_file()
    assert all(checkpoint_problem(path) is None for path in run_checkpoints(tmp_path))  # no torn file under a name


class Payload:
    """Runs code when unpickled: what a malicious checkpoint would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return open, (self.marker, "w")


def test_sharded_checkpoint_folders_are_checked_without_running_code(tmp_path):
    """A folder of ``torch.distributed.checkpoint`` shards (FSDP2): whole and plain data, or refused."""
    from torch.distributed.checkpoint import save

    def sharded(name, state):
        folder = tmp_path / name
        save(state, checkpoint_id=folder)  # one process: a folder as each rank of a sharded fit writes it
        torch.save({"global_step": 2}, folder / "meta.pt")
        return folder

    marker = tmp_path / "payload_ran"
    whole = sharded("whole.ckpt", {"state_dict": {"w": torch.ones(64, 64)}, "optimizer_0": {"lr": [0.1]}})
    assert checkpoint_problem(whole) is None
    carrying = sharded("carrying.ckpt", {"state_dict": {"w": torch.ones(2)}, "note": Payload(str(marker))})
    assert checkpoint_problem(carrying).startswith("it holds Python objects that are not plain data, refused")
    (whole / ".metadata").write_bytes(pickle.dumps(Payload(str(marker))))  # PyTorch unpickles it unchecked
    assert checkpoint_problem(whole) == ("it holds Python objects that are not plain data, refused "
                                         "(weights_only=True): io.open is not allowed in a checkpoint's .metadata")
    assert not marker.exists()
    torn = sharded("torn.ckpt", {"state_dict": {"w": torch.ones(64, 64)}})
    (shard,) = torn.glob("*.distcp")
    shard.write_bytes(shard.read_bytes()[:100])
    assert checkpoint_problem(torn) == f"shard {shard.name} is missing or truncated"
    os.remove(torn / "meta.pt")
    assert checkpoint_problem(torn) == "no meta.pt: a sharded checkpoint whose writing did not finish"


def test_last_skips_torn_and_code_carrying_checkpoints_and_says_what_it_restored(uninterrupted, tmp_path, capsys,
                                                                                 caplog):
    train, _, _, written = uninterrupted
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    shutil.copytree(written, checkpoints, symlinks=True)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=1-step=10.ckpt", "epoch=1-step=9.ckpt", "last.ckpt"]
    # The newest is torn (as a crash of a non-atomic writer leaves it); a newer one, in another version folder,
    # carries code that would run when unpickled.
    newest = checkpoints / "epoch=1-step=10.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    marker = tmp_path / "payload_ran"
    poisoned = torch.load(checkpoints / "epoch=1-step=9.ckpt", weights_only=True)
    poisoned["hyper_parameters"]["note"] = Payload(str(marker))
    (tmp_path / "lightning_logs" / "version_1" / "checkpoints").mkdir(parents=True)
    torch.save(poisoned, tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "epoch=1-step=11.ckpt")

    for explicit, reason in (("version_1/checkpoints/epoch=1-step=11.ckpt", "holds Python objects that are not "
                              "plain data, refused (weights_only=True)"), ("version_0/checkpoints/epoch=1-step=10.ckpt",
                                                                           "unreadable (")):
        with pytest.raises(SystemExit) as exit_:
            main(fit_args(tmp_path, train, f"--ckpt_path={tmp_path / 'lightning_logs' / explicit}"))
        assert exit_.value.code == 2 and reason in capsys.readouterr().err
    resumed = main(fit_args(tmp_path, train, "--ckpt_path=last", "--export.enabled=false"))
    assert not marker.exists()
    assert caplog.text.count("skipping checkpoint") == 2
    assert (f"prefmodule: resuming {checkpoints / 'epoch=1-step=9.ckpt'}: global step 9, epoch 1, 1 batches of epoch "
            "1 already trained (continuing after them)") in caplog.text
    assert resumed.trainer.global_step == 10
    assert Path(resumed.trainer.log_dir).name == "version_2"  # a resumed fit logs into a new version folder


@pytest.mark.slow
def test_fsdp2_killed_while_writing_a_sharded_checkpoint_resumes_last(tmp_path, small_data):
    """Sharded checkpoints are folders: one whose writing was cut is never taken, the one before it is."""
    from test_distributed import QUIET

    train = small_data[0]  # 32 pairs, 4 per rank and step: 4 steps an epoch
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}

    def launch(root, *extra):
        args = [*fit_args(root, train, "--trainer.max_steps=6", "--trainer.callbacks.every_steps=2", "--config",
                          str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=2",
                          "--trainer.devices=2", "--trainer.callbacks+=test_resume.KillAt",
                          f"--trainer.callbacks.log={root / 'steps.jsonl'}", *extra), *QUIET]
        with one_launch_at_a_time():
            return subprocess.run([sys.executable, "-m", "prefmodule", *args], env=env, capture_output=True,
                                  text=True, timeout=600, start_new_session=True)

    whole = launch(tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch(tmp_path / "run", "--trainer.callbacks.point=checkpoint", "--trainer.callbacks.step=4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    checkpoints = tmp_path / "run" / "lightning_logs" / "version_0" / "checkpoints"
    assert (checkpoints / "epoch=0-step=4.ckpt.partial" / "meta.pt").is_file()  # all shards written, never renamed
    assert os.readlink(checkpoints / "last.ckpt") == "epoch=0-step=2.ckpt"
    resumed = launch(tmp_path / "run", "--ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {checkpoints / 'epoch=0-step=2.ckpt'}: global step 2" in resumed.stderr
    assert steps_of(tmp_path / "run" / "steps.jsonl")[4:] == steps_of(tmp_path / "whole" / "steps.jsonl")[2:]
    exported = load_file(tmp_path / "run" / "lightning_logs" / "version_1" / "hf_model" / "model.safetensors")
    expected = load_file(tmp_path / "whole" / "lightning_logs" / "version_0" / "hf_model" / "model.safetensors")
    for name, weight in expected.items():
        torch.testing.assert_close(exported[name], weight, rtol=0, atol=1e-6, msg=name)


def test_checkpoints_hold_plain_data_only(tmp_path, small_data):
    """LoRA settings given as a ``peft.LoraConfig`` object still make a checkpoint that loads with
    ``weights_only=True``: the hyperparameters hold its arguments as plain data."""
    from peft import LoraConfig

    from prefmodule import ORPOModule, PreferenceDataModule

    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, limit_val_batches=0, enable_progress_bar=False,
                        enable_model_summary=False, logger=False)
    module = ORPOModule(model="asset://tiny-llama", lora=LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=small_data[0], batch_size=4)))
    checkpoint = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    lora = checkpoint["hyper_parameters"]["lora"]
    assert lora["r"] == 2 and sorted(lora["target_modules"]) == ["q_proj", "v_proj"]


def test_the_module_brings_its_checkpoints_unless_the_trainer_has_its_own():
    from lightning.pytorch.callbacks import ModelCheckpoint

    from prefmodule.training.checkpoints import BestCheckpoint, RunCheckpoint, default_checkpoints

    def kinds(**settings):
        return [type(cb) for cb in default_checkpoints(L.Trainer(logger=False, **settings))]

    assert kinds() == [BestCheckpoint, RunCheckpoint]  # in place of Lightning's default ModelCheckpoint
    assert kinds(callbacks=[RunCheckpoint(every_steps=100)]) == [BestCheckpoint]
    assert kinds(callbacks=[ModelCheckpoint(monitor="val/rewards/accuracies", mode="max")]) == []
    assert kinds(enable_checkpointing=False) == []


class TermAt(L.Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler preempting the job


@pytest.mark.slow
def test_sigterm_checkpoints_the_step_and_exits_143(uninterrupted, tmp_path, caplog):
    train, expected, expected_steps, _ = uninterrupted
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(tmp_path, train, "--trainer.callbacks+=test_resume.TermAt", "--trainer.callbacks.step=5"))
    assert exit_.value.code == 143
    checkpoints = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    assert os.readlink(checkpoints / "last.ckpt") == "epoch=0-step=5.ckpt"  # Lightning finished step 5, then stopped
    resumed = main(fit_args(tmp_path, train, "--ckpt_path=last"))
    assert "epoch=0-step=5.ckpt: global step 5, epoch 0, 5 batches of epoch 0 already trained" in caplog.text
    exported = load_file(Path(resumed.trainer.log_dir) / "hf_model" / "model.safetensors")
    for name, weight in expected.items():
        torch.testing.assert_close(exported[name], weight, rtol=0, atol=1e-6, msg=name)
