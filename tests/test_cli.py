"""The CLI as a user drives it: every shipped config, print_config, validate/test/predict."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import yaml

from prefmodule.cli import main
from prefmodule.errors import ConfigError, find_user_error

from conftest import one_launch_at_a_time

CONFIGS = Path(__file__).parent.parent / "configs"


def fit_args(config, root, train, val, *extra):
    return ["fit", "--config", str(CONFIGS / config), f"--trainer.default_root_dir={root}",
            f"--data.train={train}", f"--data.val={val}", "--trainer.enable_progress_bar=false",
            "--trainer.max_steps=3", "--trainer.val_check_interval=3", "--trainer.log_every_n_steps=1",
            "--data.batch_size=4", *extra]


PAIR_METRICS = ("train/loss", "train/rewards/accuracies", "train/rewards/margins", "train/logps/chosen",
                "train/logits/rejected", "val/loss", "val/rewards/accuracies", "val/rewards/chosen")
KTO_METRICS = ("train/loss", "train/kl", "train/rewards/chosen", "train/rewards/rejected", "train/logps/chosen",
               "train/logits/rejected", "val/loss", "val/kl", "val/rewards/margins")


@pytest.mark.parametrize("config, metrics", [("orpo.yaml", PAIR_METRICS), ("dpo.yaml", PAIR_METRICS),
                                             ("simpo.yaml", PAIR_METRICS), ("cpo.yaml", PAIR_METRICS),
                                             ("kto.yaml", KTO_METRICS)])
def test_fit_each_config_writes_metrics_checkpoint_and_hf_model(config, metrics, tmp_path, small_data):
    train, val = small_data
    cli = main(fit_args(config, tmp_path, train, val))
    log_dir = Path(cli.trainer.log_dir)
    assert log_dir.is_relative_to(tmp_path)
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    for name in (*metrics, "train/tokens_per_sec"):
        assert name in rows[0], name
    val_loss = [float(r["val/loss"]) for r in rows if r["val/loss"]]
    assert val_loss == [pytest.approx(cli.trainer.callback_metrics["val/loss"].item(), rel=1e-6)]  # one validation
    if "val/rewards/accuracies" in metrics:  # a share of the 16 val pairs
        accuracy = float(next(r["val/rewards/accuracies"] for r in rows if r["val/rewards/accuracies"]))
        assert accuracy * 16 == pytest.approx(round(accuracy * 16), abs=1e-5)
    assert cli.trainer.global_step == 3
    assert (log_dir / "checkpoints" / "last.ckpt").exists()
    assert (log_dir / "hf_model" / "model.safetensors").is_file()
    assert (log_dir / "hf_model" / "tokenizer_config.json").is_file()


def test_orpo_logs_its_own_metrics(tmp_path, small_data):
    cli = main(fit_args("orpo.yaml", tmp_path, *small_data))
    metrics = cli.trainer.callback_metrics
    for name in ("val/nll_loss", "val/log_odds_ratio", "val/log_odds_chosen"):
        assert name in metrics
    assert metrics["val/log_odds_ratio"] < 0  # mean log sigmoid(.) is always negative


def test_model_chosen_by_flag(tmp_path, small_data):
    cli = main(fit_args("orpo.yaml", tmp_path, *small_data, "--model=prefmodule.DPOModule",
                        "--model.beta=0.2", "--trainer.max_steps=1"))
    from prefmodule import DPOModule

    assert isinstance(cli.model, DPOModule) and cli.model.hparams.beta == 0.2


def test_print_config_round_trips(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.beta=0.3", "--print_config"])
    printed = capsys.readouterr().out
    config = yaml.safe_load(printed)
    assert config["model"]["class_path"] == "prefmodule.DPOModule"
    assert config["model"]["init_args"]["beta"] == 0.3
    assert config["model"]["init_args"]["lr"] == 3.0e-3  # base-class argument, reached through **kwargs
    assert config["data"]["batch_size"] == 16
    saved = tmp_path / "printed.yaml"
    saved.write_text(printed)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(saved), "--print_config"])
    assert yaml.safe_load(capsys.readouterr().out) == config


def test_validate_test_and_predict_from_checkpoint(tmp_path, small_data):
    train, val = small_data
    cli = main(fit_args("dpo.yaml", tmp_path, train, val))
    ckpt = cli.trainer.checkpoint_callback.last_model_path or cli.trainer.checkpoint_callback.best_model_path
    common = ["--config", str(CONFIGS / "dpo.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--data.val={val}", "--trainer.enable_progress_bar=false", f"--ckpt_path={ckpt}"]
    validated = main(["validate", *common])
    tested = main(["test", *common])
    assert "test/rewards/margins" in tested.trainer.callback_metrics

    out = tmp_path / "scores.jsonl"
    main(["predict", *common, f"--predictions.path={out}"])
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(16))
    for r in rows:
        assert r["preferred"] == ("chosen" if r["chosen_reward"] > r["rejected_reward"] else "rejected")
        assert r["chosen_logps"] < 0 and r["rejected_logps"] < 0
    # validate's accuracy is the share of pairs that predict, on the same weights, finds preferring chosen
    assert validated.trainer.callback_metrics["val/rewards/accuracies"].item() == pytest.approx(
        sum(r["preferred"] == "chosen" for r in rows) / 16, abs=1e-6)
    assert tested.trainer.callback_metrics["test/rewards/accuracies"].item() == pytest.approx(
        validated.trainer.callback_metrics["val/rewards/accuracies"].item(), abs=1e-6)  # test falls back to val


# ----- exit codes and errors: what a scheduler and a person see ------------------------------------------
def run_command(command, *args, timeout=300):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    if "--trainer.devices=2" not in args:
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)
    with one_launch_at_a_time():
        return subprocess.run([*command, *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # the same ``console()`` as the installed command; in-process tests check its errors
def test_python_m_prints_a_config_error_alone_and_exits_2(tmp_path):
    done = run_command([sys.executable, "-m", "prefmodule"], "fit", "--config", str(CONFIGS / "dpo.yaml"),
                       "--model.beta=-1", f"--trainer.default_root_dir={tmp_path}")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == ("prefmodule: error: model.beta=-1.0: must be > 0 (the "
                                                    "objective's temperature or weight; DPO typically 0.1).")
    assert "Traceback" not in done.stderr


def fails_with(capsys, *args) -> tuple[int, str]:
    """Exit code and error line of the CLI on ``args`` (in this process); exactly one error line is printed."""
    with pytest.raises(SystemExit) as exit_:
        main(list(args))
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("prefmodule: error:")]
    assert "Traceback" not in err
    return exit_.value.code, line


def test_traceback_flag_and_variable_show_the_user_error(tmp_path, monkeypatch, capsys):
    args = ["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.beta=-1", f"--trainer.default_root_dir={tmp_path}"]
    assert fails_with(capsys, *args) == (2, "prefmodule: error: model.beta=-1.0: must be > 0 (the objective's "
                                            "temperature or weight; DPO typically 0.1).")
    with pytest.raises(Exception) as shown:
        main([*args, "--traceback"])
    assert isinstance(find_user_error(shown.value), ConfigError)
    monkeypatch.setenv("PREFMODULE_TRACEBACK", "1")
    with pytest.raises(Exception) as shown:
        main(args)
    assert "model.beta=-1.0" in str(find_user_error(shown.value))


class Crash(L.Callback):
    def on_train_start(self, trainer, pl_module):
        raise RuntimeError("a bug, not a user error")


def test_other_failures_keep_their_traceback(tmp_path, small_data):
    with pytest.raises(RuntimeError, match="a bug, not a user error"):
        main(fit_args("orpo.yaml", tmp_path, *small_data, "--trainer.callbacks+=test_cli.Crash"))


def test_constructor_value_errors_are_configuration_errors(tmp_path, capsys):
    code, err = fails_with(capsys, "fit", "--config", str(CONFIGS / "dpo.yaml"),  # devices: refused by Lightning
                           f"--trainer.default_root_dir={tmp_path}", "--trainer.devices=0")
    assert code == 2 and err.startswith("prefmodule: error: `Trainer(devices='0')` value is not a valid input")


@pytest.mark.slow
def test_an_error_inside_fit_on_every_rank_prints_once(tmp_path, small_data):
    """Under DDP (ranks launched by Lightning) a user error raised in fit stops every rank with its exit code
    and one message: here the non-finite guard, stopping at the first NaN step."""
    from test_distributed import QUIET

    done = run_command([sys.executable, "-m", "prefmodule"], *fit_args(
        "orpo.yaml", tmp_path, *small_data, "--model=test_guard.PoisonedORPO", "--model.poisoned=[2]",
        "--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.limit_val_batches=0",
        "--trainer.callbacks+=prefmodule.training.guard.NonFiniteGuard", "--trainer.callbacks.max_in_a_row=1"), *QUIET)
    assert done.returncode == 3, done.stderr[-3000:]
    (line,) = [line for line in done.stderr.splitlines() if "prefmodule: error:" in line]
    assert line.startswith("prefmodule: error: training stopped: the loss or gradient norm was non-finite")
    assert "Traceback" not in done.stderr


def test_what_a_run_leaves_is_set_in_groups_beside_model_and_data(tmp_path, small_data):
    train, val = small_data
    cli = main(fit_args("orpo.yaml", tmp_path, train, val, "--samples.num_prompts=2", "--samples.max_new_tokens=3",
                        "--export.enabled=false"))
    log_dir = Path(cli.trainer.log_dir)
    samples = [json.loads(line) for line in (log_dir / "samples.jsonl").read_text().splitlines()]
    assert [row["step"] for row in samples] == [0, 0, 3, 3]
    assert not (log_dir / "hf_model").exists() and list((log_dir / "checkpoints").glob("*.ckpt"))
    writers = [type(c).__name__ for c in cli.trainer.callbacks if type(c).__name__ in
               ("SampleWriter", "ExportModel", "PushToHub", "PredictionWriter")]
    assert writers == ["SampleWriter", "ExportModel", "PushToHub", "PredictionWriter"]  # the groups', each once
    assert not set(cli.model.hparams) & {"samples", "export_hf", "predictions_path"}  # the objective's alone


@pytest.mark.parametrize("given, where, new", [
    (["--model.init_args.samples=null"], "--model.init_args.samples on the command line", "samples"),
    (["--model.export_hf=false"], "--model.export_hf on the command line", "export.enabled"),
    (["--model.init_args.predictions_path=out.jsonl"], "--model.init_args.predictions_path on the command line",
     "predictions.path"),
    ("config", "model.init_args.export_merged in {config}", "export.merge_adapters"),
])
def test_an_option_that_moved_to_a_group_exits_2_naming_its_place(given, where, new, tmp_path, capsys):
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump({"model": {"class_path": "prefmodule.ORPOModule", "init_args": {
        "model": "asset://tiny-llama", "export_merged": False}}}))
    args = ["--config", str(config)] if given == "config" else given
    code, error = fails_with(capsys, "fit", "--config", str(CONFIGS / "orpo.yaml"), *args,
                             f"--trainer.default_root_dir={tmp_path}")
    old = where.split(" ")[0].rsplit(".", 1)[-1]
    assert (code, error) == (2, f"prefmodule: error: {where.format(config=config)}: `{old}` is no longer a model "
                                f"option; set `{new}` (a group beside model and data: --{new}=... or "
                                f"`{new.split('.')[0]}:` at the top of a config)")


def test_python_connects_the_data_before_lightning_reads_it(tmp_path, small_data):
    """``module.connect(data)`` before ``fit``: ``prepare_data`` and ``setup`` build the datasets as the objective
    needs them (KTO: unpaired rows) before any weights load; without it, one error says what to call."""
    from prefmodule import KTOModule, PreferenceDataModule

    class Seen(L.Callback):
        def setup(self, trainer, pl_module, stage):
            self.datasets = {split: type(d).__name__ for split, d in trainer.datamodule.datasets.items()}
            self.policy = pl_module.policy

    module, seen = KTOModule(model="asset://tiny-llama"), Seen()
    data = PreferenceDataModule(train=small_data[0], val=small_data[1], batch_size=4)
    L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_progress_bar=False,
              enable_model_summary=False, callbacks=[seen]).fit(module, datamodule=module.connect(data))
    assert seen.datasets == {"train": "UnpairedDataset", "val": "UnpairedDataset"} and seen.policy is None
    trainer = lambda: L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False)  # noqa: E731
    with pytest.raises(ConfigError, match=r"PreferenceDataModule needs a tokenizer: connect it to the objective being "
                                          r"trained before Lightning runs it \(`trainer.fit\(module, "
                                          r"datamodule=module.connect\(data\)\)`"):
        trainer().fit(KTOModule(model="asset://tiny-llama"), datamodule=PreferenceDataModule(train=small_data[0]))
    with pytest.raises(ConfigError, match=r"PreferenceDataModule is not connected to this KTOModule: call "
                                          r"trainer.fit\(module, datamodule=module.connect\(data\)\)"):
        trainer().fit(KTOModule(model="asset://tiny-llama"),
                      datamodule=PreferenceDataModule(train=small_data[0], tokenizer="asset://tiny-llama"))
