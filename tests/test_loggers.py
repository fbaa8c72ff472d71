"""Real loggers through the CLI, offline: TensorBoard, MLflow (local file store) and W&B (offline mode) for
fit, validate and test, each next to the CSV logger every run keeps; the end-of-fit line with any logger or
none; Lightning's promotional tips silenced."""

import csv
import glob
import json
import logging
import struct
import time
from pathlib import Path

import lightning as L
import pytest

from prefmodule import DPOModule, PreferenceDataModule
from prefmodule.cli import main
from prefmodule.training.callbacks import SampleWriter

from conftest import TINY_MODEL

pytestmark = pytest.mark.samples  # the modules' default samples stay on here

CONFIGS = Path(__file__).parent.parent / "configs"
QUICK = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--data.batch_size=8",
         "--samples.num_prompts=2", "--samples.max_new_tokens=4"]


@pytest.fixture(autouse=True)
def offline_trackers(monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("WANDB_SILENT", "true")


def logger_args(name: str, root: Path) -> list[str]:
    return {
        "tensorboard": ["--trainer.logger=TensorBoardLogger", f"--trainer.logger.save_dir={root}"],
        "mlflow": ["--trainer.logger=MLFlowLogger", f"--trainer.logger.save_dir={root / 'mlruns'}",
                   "--trainer.logger.experiment_name=prefmodule"],
        "wandb": ["--trainer.logger=WandbLogger", "--trainer.logger.offline=true", f"--trainer.logger.save_dir={root}",
                  "--trainer.logger.project=prefmodule"],
    }[name]


def csv_column(path: Path, name: str) -> list[tuple[int, float]]:
    return [(int(row["step"]), float(row[name])) for row in csv.DictReader(open(path)) if row.get(name)]


def tensorboard_events(folder: str) -> list:
    """Every ``Event`` of the folder's TFRecord event files (length, CRC, payload, CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    events = []
    for path in sorted(glob.glob(f"{folder}/events.out.tfevents.*")):
        data, position = open(path, "rb").read(), 0
        while position < len(data):
            (length,) = struct.unpack("<Q", data[position: position + 8])
            event = Event()
            event.ParseFromString(data[position + 12: position + 12 + length])
            events.append(event)
            position += 12 + length + 4
    return events


def wandb_records(run_folder: str) -> list:
    """The records of a finished W&B run's file, up to its ``exit`` record (the writer may still be closing it)."""
    for _ in range(50):
        records = read_wandb_file(*glob.glob(f"{run_folder}/run-*.wandb"))
        if records and records[-1].WhichOneof("record_type") == "exit":
            return records
        time.sleep(0.2)
    raise AssertionError(f"{run_folder}: the W&B run was not closed")


def read_wandb_file(path: str) -> list:
    """The records of a W&B run file (a LevelDB-style log of 32 KiB blocks after a 7-byte header)."""
    from wandb.proto.wandb_internal_pb2 import Record

    data, position, chunks, records = open(path, "rb").read(), 7, b"", []
    while position + 7 <= len(data):
        if 32768 - position % 32768 < 7:  # a block's tail too short for a record header is padding
            position += 32768 - position % 32768
            continue
        length, kind = struct.unpack("<HB", data[position + 4: position + 7])
        chunks += data[position + 7: position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def logged_by(name: str, logger) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    """What the tracker itself stored: metric -> (step, value) points, and the completions of its samples tables."""
    metrics, completions = {}, []
    if name == "tensorboard":
        for event in tensorboard_events(logger.log_dir):
            for value in event.summary.value:
                if value.tag == "samples/text_summary":
                    completions.append(value.tensor.string_val[0].decode())
                elif value.HasField("simple_value"):
                    metrics.setdefault(value.tag, []).append((event.step, value.simple_value))
    elif name == "mlflow":
        run = Path(logger.save_dir) / logger.experiment_id / logger.run_id
        for path in (run / "metrics").rglob("*"):
            if path.is_file():
                points = [line.split() for line in path.read_text().splitlines()]
                metrics[str(path.relative_to(run / "metrics"))] = [(int(s), float(v)) for _, v, s in points]
        samples = run / "artifacts" / "samples.jsonl"
        completions = [json.loads(line)["completion"] for line in samples.read_text().splitlines()] \
            if samples.is_file() else []
    else:
        run_folder = str(Path(logger.experiment.dir).parent)
        for record in wandb_records(run_folder):
            if record.WhichOneof("record_type") == "history":
                items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
                for key, value in items.items():
                    if isinstance(value, (int, float)) and not key.startswith("_"):
                        metrics.setdefault(key, []).append((items.get("trainer/global_step"), value))
        for table in sorted(glob.glob(f"{run_folder}/files/media/table/samples_*.table.json")):
            content = json.load(open(table))
            column = content["columns"].index("completion")
            completions += [row[column] for row in content["data"]]
    return metrics, completions


def finish(name: str) -> None:
    if name == "wandb":  # a W&B run stays open in the process: the next command would log into it
        import wandb

        wandb.finish()


@pytest.mark.parametrize("name", ["tensorboard", "mlflow", "wandb"])
def test_logger_gets_fit_validate_and_test_next_to_the_csv(name, tmp_path, small_data, caplog):
    train, val = small_data
    common = ["--config", str(CONFIGS / "orpo.yaml"), f"--trainer.default_root_dir={tmp_path}", f"--data.val={val}",
              *QUICK, *logger_args(name, tmp_path)]
    with caplog.at_level(logging.INFO):
        fit = main(["fit", *common, f"--data.train={train}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
                    "--trainer.log_every_n_steps=1"])
    finish(name)
    csv_logger, tracker = fit.trainer.loggers
    run_dir = tmp_path / "lightning_logs" / "version_0"
    assert Path(csv_logger.log_dir) == run_dir  # the CSV leads: the run's folder holds everything
    assert (run_dir / "hf_model" / "README.md").is_file() and (run_dir / "report.html").is_file()
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [0, 0, 2, 2]

    metrics, completions = logged_by(name, tracker)
    expected = csv_column(run_dir / "metrics.csv", "val/loss")
    assert [step for step, _ in metrics["val/loss"]] == [step for step, _ in expected] and len(expected) == 1
    assert metrics["val/loss"][0][1] == pytest.approx(expected[0][1], rel=1e-6)
    assert "train/lr" in metrics and "train/tokens_per_sec" in metrics
    assert all(row["completion"] in "".join(completions) for row in samples)  # the samples tables reached it

    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("prefmodule: fit done"))
    tracker_location = tracker.log_dir if name == "tensorboard" else str(Path(tracker.experiment.dir).parent) \
        if name == "wandb" else str(Path(tracker.save_dir) / tracker.experiment_id / tracker.run_id)
    assert f"metrics: {run_dir / 'metrics.csv'}, {tracker_location} |" in summary

    ckpt = str(next((run_dir / "checkpoints").glob("*.ckpt")))
    for command, metric in (("validate", "val/rewards/accuracies"), ("test", "test/rewards/accuracies")):
        cli = main([command, *common, f"--ckpt_path={ckpt}"])
        finish(name)
        metrics, _ = logged_by(name, cli.trainer.loggers[1])
        assert metrics[metric][0][1] == pytest.approx(cli.trainer.callback_metrics[metric].item(), rel=1e-6), command


def test_no_logger_still_summarises_and_reports(tmp_path, small_data, caplog):
    train, val = small_data
    with caplog.at_level(logging.INFO):
        main(["fit", "--config", str(CONFIGS / "orpo.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--data.train={train}", f"--data.val={val}", "--trainer.logger=false", "--trainer.max_steps=1",
              "--trainer.val_check_interval=1", *QUICK])
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("prefmodule: fit done"))
    assert f"HF model: {tmp_path / 'hf_model'} |" in summary and "metrics: (no logger) |" in summary
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 4  # 2 prompts, before and at step 1
    assert "no metrics.csv in this folder" in (tmp_path / "report.html").read_text()


def test_python_trainer_with_mlflow_alone_writes_into_its_run(tmp_path, small_data, caplog):
    """Without the CLI's CSV logger the run's folder is the tracker's run (where ModelCheckpoint writes too)."""
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="prefmodule", save_dir=str(tmp_path / "mlruns"))
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=logger, enable_progress_bar=False,
                        enable_model_summary=False, val_check_interval=1, callbacks=[SampleWriter(num_prompts=0)])
    with caplog.at_level(logging.INFO):
        module = DPOModule(model=TINY_MODEL)
        trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=small_data[0], val=small_data[1],
                                                                           batch_size=8)))
    run = tmp_path / "mlruns" / logger.experiment_id / logger.run_id
    assert (run / "hf_model" / "model.safetensors").is_file() and list((run / "checkpoints").glob("*.ckpt"))
    assert (run / "metrics" / "val" / "loss").is_file()
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("prefmodule: fit done"))
    assert f"metrics: {run} |" in summary and "report: (nothing to report: no metrics.csv, no samples)" in summary


def test_lightning_tips_are_silenced(tmp_path, caplog):
    with caplog.at_level(logging.INFO):
        L.Trainer(default_root_dir=tmp_path, logger=True, enable_checkpointing=True)
    assert not [r for r in caplog.records if "Tip" in r.getMessage()]


class BatchTokens(L.Callback):
    def __init__(self):
        self.tokens, self.pairs = [], []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.tokens.append(int(batch.sequences.attention_mask.sum()))
        self.pairs.append(batch.index.numel())


def test_throughput_counts_pairs_tokens_and_model_flops(tmp_path, small_data):
    from lightning.pytorch.loggers import CSVLogger

    module, seen = DPOModule(model=TINY_MODEL), BatchTokens()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, log_every_n_steps=1, logger=CSVLogger(tmp_path),
                        callbacks=[seen, SampleWriter(num_prompts=0)], enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=small_data[0], val=small_data[1],
                                                                       batch_size=8)))
    rows = {}
    for row in csv.DictReader(open(tmp_path / "lightning_logs" / "version_0" / "metrics.csv")):
        rows.setdefault(int(row["step"]), {}).update({k: float(v) for k, v in row.items() if v and k.startswith("train/")})
    assert [rows[step]["train/lengths"] for step in range(3)] == [sum(seen.tokens[: i + 1]) for i in range(3)]
    assert [rows[step]["train/samples"] for step in range(3)] == [8, 16, 24]
    policy = sum(p.numel() for p in module.policy.parameters())
    for step in (1, 2):  # rates need two points; DPO: 6N to train the policy plus 2N for the frozen copy's forward
        row = rows[step]
        assert row["train/device/flops_per_sec"] / row["train/device/items_per_sec"] == pytest.approx(8 * policy)
        assert row["train/tokens_per_sec"] == pytest.approx(row["train/device/items_per_sec"])
    assert trainer.progress_bar_metrics["train/tokens_per_sec"] == pytest.approx(rows[2]["train/tokens_per_sec"])


def test_flops_per_token_with_lora_and_an_adapter_reference():
    from prefmodule.training.throughput import flops_per_token

    module = DPOModule(model=TINY_MODEL, lora={"r": 4}, reference="adapter")
    module.configure_model()
    total = sum(p.numel() for p in module.policy.parameters())
    adapters = sum(p.numel() for p in module.policy.parameters() if p.requires_grad)
    assert 0 < adapters < total / 10
    # forward and backward through everything, weight gradients of the adapters, the reference forward
    assert flops_per_token(module, training=True) == 2 * total + 2 * total + 2 * adapters + 2 * total
    assert flops_per_token(module, training=False) == 2 * total + 2 * total
