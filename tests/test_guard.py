"""The non-finite guard: a NaN step changes nothing, is counted and named; a run that keeps diverging stops
with a message and never exports NaN weights."""

import csv
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from prefmodule import ORPOModule, PreferenceDataModule
from prefmodule.cli import main
from prefmodule.errors import NonFiniteError
from prefmodule.training.guard import NonFiniteGuard

from conftest import TINY_MODEL

CONFIGS = Path(__file__).parent.parent / "configs"


class PoisonedORPO(ORPOModule):
    """ORPO whose loss is NaN at the optimizer steps in ``poisoned`` (1-based), on the ranks in ``ranks``."""

    def __init__(self, *args, poisoned: list[int] = (), ranks: list[int] = (0,), **kwargs):
        super().__init__(*args, **kwargs)
        self.poisoned, self.ranks = list(poisoned), list(ranks)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        poison = self.global_step + 1 in self.poisoned and self.global_rank in self.ranks
        return loss * float("nan") if poison else loss


class WeightsAfterEachStep(L.Callback):
    def __init__(self):
        self.weights, self.lrs, self.pairs = [], [], []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.weights.append([p.detach().clone() for p in module.policy.parameters()])
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.pairs.append(sorted(batch.index.tolist()))


def test_a_non_finite_step_leaves_weights_optimizer_and_schedule_untouched(tmp_path, small_data, caplog):
    train, _ = small_data
    module = PoisonedORPO(model=TINY_MODEL, lr=1e-3, warmup=0, poisoned=[3])
    record = WeightsAfterEachStep()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=5, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, log_every_n_steps=1, callbacks=[record], logger=CSVLogger(tmp_path))
    trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, batch_size=4)))

    assert all(torch.equal(after, before) for after, before in zip(record.weights[2], record.weights[1]))
    assert not all(torch.equal(after, before) for after, before in zip(record.weights[3], record.weights[2]))
    optimizer = trainer.optimizers[0]
    assert {state["step"].item() for state in optimizer.state.values()} == {4.0}  # 5 steps, 1 skipped
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 4 and record.lrs[2] == record.lrs[1]  # the linear decay waited one step
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert (guard.skipped, guard.in_a_row) == (1, 0)
    rows = list(csv.DictReader(open(Path(trainer.log_dir) / "metrics.csv")))
    assert [float(r["train/skipped_steps"]) for r in rows if r["train/skipped_steps"]] == [0, 0, 1, 1, 1]
    assert (f"step 3 skipped, its loss is not finite: weights, optimizer and LR schedule unchanged. Its pairs (data "
            f"rows): {record.pairs[2]}. 1 in a row (training stops at 10).") in caplog.text


def test_diverging_fit_stops_non_finite_names_the_last_good_checkpoint_and_exports_nothing(tmp_path, small_data,
                                                                                          capsys, caplog):
    train, val = small_data  # SGD with lr 1e30: step 1 blows the weights up, every later loss is NaN
    args = ["fit", "--config", str(CONFIGS / "orpo.yaml"), f"--trainer.default_root_dir={tmp_path}",
            f"--data.train={train}", f"--data.val={val}", "--data.batch_size=4", "--trainer.max_steps=20",
            "--trainer.limit_val_batches=0", "--trainer.enable_progress_bar=false", "--model.lr_schedule=constant",
            "--model.warmup=0",
            "--model.optimizer=torch.optim.SGD", "--model.optimizer.lr=1e30",
            "--trainer.callbacks+=prefmodule.training.checkpoints.RunCheckpoint", "--trainer.callbacks.every_steps=1",
            "--trainer.callbacks+=prefmodule.training.guard.NonFiniteGuard", "--trainer.callbacks.max_in_a_row=3"]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    captured = capsys.readouterr()
    assert exit_.value.code == 3 and "Traceback" not in captured.err
    (message,) = [line for line in captured.err.splitlines() if line.startswith("prefmodule: error:")]
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "epoch=0-step=3.ckpt"
    assert message == (
        "prefmodule: error: training stopped: the loss or gradient norm was non-finite (NaN or infinite) at 3 "
        "optimizer steps in a row (steps 2-4); each was skipped, so the weights are those before step 2. Try "
        "gradient clipping (--trainer.gradient_clip_val=1.0), a lower learning rate in a new fit (now 1e+30; a "
        "resumed fit restores the optimizer's), bf16-mixed instead of 16-mixed precision, or check the pairs named in "
        f"the warnings above. The newest checkpoint, {checkpoint}, holds these weights (--ckpt_path=last resumes "
        "from it).")
    assert caplog.text.count("skipped, its loss is not finite") == 3
    assert not (tmp_path / "lightning_logs" / "version_0" / "hf_model").exists()
    # one checkpoint a step (every_steps=1), the newest two kept, last.ckpt linking to the newest
    assert sorted(p.name for p in checkpoint.parent.iterdir()) == ["epoch=0-step=2.ckpt", "epoch=0-step=3.ckpt",
                                                                   "last.ckpt"]
    assert os.readlink(checkpoint.parent / "last.ckpt") == checkpoint.name


def test_export_refuses_non_finite_weights(tmp_path):
    module = ORPOModule(model=TINY_MODEL)
    module.configure_model()
    with torch.no_grad():
        module.policy.model.layers[1].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"weights \(NaN or infinite: model.layers.1.mlp.up_proj.weight\)"):
        module.export_hf(str(tmp_path / "hf"))
    assert not (tmp_path / "hf").exists()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [
    ["--trainer.strategy=ddp"],
    ["--config", str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=2",
     "--trainer.strategy.save_distributed_checkpoint=false"],
], ids=["ddp", "fsdp2"])
def test_all_ranks_skip_together(strategy, tmp_path, small_data):
    """The loss is NaN on rank 1 only, at step 2: both ranks drop that step, and the fit goes on."""
    from test_distributed import launch

    launch("fit", "--config", str(CONFIGS / "orpo.yaml"), *strategy, "--model=test_guard.PoisonedORPO",
           "--model.poisoned=[2]", "--model.ranks=[1]", "--model.lr=1e-3", f"--trainer.default_root_dir={tmp_path}",
           f"--data.train={small_data[0]}", "--trainer.max_steps=4", "--trainer.limit_val_batches=0")
    log_dir = tmp_path / "lightning_logs" / "version_0"
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    assert [float(r["train/skipped_steps"]) for r in rows if r["train/skipped_steps"]] == [0, 1, 1, 1]
    checkpoint = torch.load(log_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 4
    assert {state["step"].item() for state in checkpoint["optimizer_states"][0]["state"].values()} == {3.0}
    assert checkpoint["lr_schedulers"][0]["last_epoch"] == 3
