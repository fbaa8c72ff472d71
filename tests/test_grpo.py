"""GRPO and RLOO (``configs/grpo.yaml``, ``configs/rloo.yaml``): fits from the CLI with TRL's metrics, the loss is
``grpo_loss`` on the module's own per-token log-probs, a row's columns reach the reward, a None reward gives
advantage 0, whole groups per rank under DDP, ``num_iterations`` reuses a generation batch across a kill -9, and
bad input exits 2 with one line."""

import csv
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from prefmodule import GRPOModule, PreferenceDataModule, RLOOModule
from prefmodule.cli import main
from prefmodule.models.logps import stats_from_hidden, stats_from_logits
from prefmodule.objectives.losses.policy_gradient import (
    GRPOAdvantages, GRPOLoss, RLOOAdvantages, RLOOLoss, grpo_advantages, grpo_loss, rloo_advantages, rloo_loss,
)
from prefmodule.paths import resolve

from conftest import TINY_MODEL, read_jsonl, write_jsonl

CONFIGS = Path(__file__).parent.parent / "configs"
TESTS = Path(__file__).parent
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu",
         "--samples.num_prompts=0", "--trainer.num_sanity_val_steps=0"]
POLITENESS = "prefmodule.sampling.rules:politeness"
# Logged every training step and every validation, TRL's names (``kl`` too with beta > 0).
METRICS = {"loss", "reward", "reward_std", "frac_reward_zero_std", "completions/mean_length",
           "completions/clipped_ratio", "entropy", "clip_ratio/low_mean", "clip_ratio/high_mean",
           "clip_ratio/region_mean", "rewards/politeness/mean", "rewards/politeness/std"}


@pytest.fixture
def prompts(tmp_path, demo_rows):
    """16 distinct prompts alone, each with an ``answer`` column (its number) and a column no reward reads."""
    texts = list(dict.fromkeys(row["prompt"] for row in demo_rows))[:16]
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text, "answer": str(i), "source": "demo"}
                                                    for i, text in enumerate(texts)])


def rows_of(log_dir) -> list[dict]:
    return [{k: float(v) for k, v in row.items() if v} for row in csv.DictReader(open(Path(log_dir) / "metrics.csv"))]


def fit(config: str, prompts: str, root, *args: str):
    return main(["fit", "--config", str(CONFIGS / config), f"--data.train={prompts}", f"--data.val={prompts}",
                 "--data.batch_size=4", "--data.eval_batch_size=8", "--trainer.max_steps=3", "--trainer.max_epochs=1",
                 "--trainer.log_every_n_steps=1", "--trainer.val_check_interval=3", "--trainer.limit_val_batches=1",
                 "--model.max_new_tokens=12", f"--trainer.default_root_dir={root}", *QUIET, *args])


@pytest.mark.parametrize("config, kl", [("grpo.yaml", False), ("rloo.yaml", True)])
def test_the_yaml_fits_from_the_cli_and_logs_trls_metrics(config, kl, prompts, tmp_path):
    cli = fit(config, prompts, tmp_path)
    module = cli.trainer.lightning_module
    rows = rows_of(cli.trainer.log_dir)
    train = [row for row in rows if "train/reward" in row]
    val = next(row for row in rows if "val/reward" in row)
    names = METRICS | ({"kl"} if kl else set())
    assert [int(row["step"]) for row in train] == [0, 1, 2]
    assert all({f"train/{name}" for name in names} <= row.keys() for row in train)
    assert {f"val/{name}" for name in names} <= val.keys() and ("train/kl" in train[0]) is kl
    # each step samples 4 prompts x 4 completions; the count sums their tokens over the steps, all ranks
    completions = [16 * row["train/completions/mean_length"] for row in train]
    assert [row["train/sampled_tokens"] for row in train] == pytest.approx(
        [sum(completions[:k + 1]) for k in range(3)]) and module.sampled_tokens == train[-1]["train/sampled_tokens"]
    for row in train:
        assert 0 < row["train/completions/mean_length"] <= 12 and 0 <= row["train/completions/clipped_ratio"] <= 1
        assert 0 < row["train/entropy"] < math.log(1024) + 1e-3 and row["train/reward_std"] >= 0
        assert row["train/rewards/politeness/mean"] == pytest.approx(row["train/reward"])
    if kl:  # the reference is the starting policy: no KL before the first update, some after
        assert train[0]["train/kl"] == pytest.approx(0.0, abs=1e-6) and train[-1]["train/kl"] != 0.0
    else:
        assert module.ref_model is None  # beta 0: no reference model at all
    start = load_file(Path(resolve(TINY_MODEL)) / "model.safetensors")
    trained = load_file(Path(cli.trainer.log_dir) / "hf_model" / "model.safetensors")
    assert any(not torch.equal(start[name], trained[name]) for name in start)  # the steps moved the weights


def module_and_batch(prompts, module_class=GRPOModule, padding_free=None, **settings):
    """A module set up on a trainer without fitting, and a batch of 4 of ``prompts``."""
    module = module_class(model=TINY_MODEL, reward=settings.pop("reward", POLITENESS), max_new_tokens=10,
                          **settings)
    data = PreferenceDataModule(train=prompts, batch_size=4, padding_free=padding_free)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu", max_steps=1)
    module.trainer, data.trainer, trainer.datamodule = trainer, trainer, module.connect(data)
    module.configure_model()
    data.setup("fit")
    return module, next(iter(data.train_dataloader()))


def own_token_logps(model, sequences) -> tuple[torch.Tensor, torch.Tensor]:
    """``[completions, T]`` per-token log-probs of each completion from the model's full logits on each
    sequence alone (no padding, no packing), and the mask: computed here, apart from the library's path."""
    ids, labels = sequences.input_ids[0], sequences.labels[0]
    owners = sequences.sequence_ids[0]
    rows, width = [], 0
    for k in range(int(owners.max()) + 1):
        own = owners == k
        logits = model(input_ids=ids[own][None]).logits[0, :-1]
        targets = labels[own][1:]
        logps = torch.log_softmax(logits.float(), -1)[targets != -100].gather(-1, targets[targets != -100, None])
        rows.append(logps[:, 0])
        width = max(width, len(rows[-1]))
    logps = torch.stack([F.pad(row, (0, width - len(row))) for row in rows])
    return logps, torch.arange(width)[None] < torch.tensor([len(row) for row in rows])[:, None]


@pytest.mark.parametrize("settings", [
    dict(),  # TRL's defaults: dapo, token level, beta 0
    dict(loss_type="grpo", importance_sampling_level="sequence", beta=0.1, epsilon_high=0.28),
    dict(loss_type="dr_grpo", scale_rewards="none"),
])
def test_the_loss_is_grpo_loss_on_the_modules_own_per_token_logps(settings, prompts):
    module, batch = module_and_batch(prompts, num_generations=3, **settings)
    assert module.collator().padding_free  # packed sequences, compared with each sequence alone
    module.eval()  # the step samples anew (training keeps nothing for num_iterations 1 either)
    outputs, _ = module.batch_outputs(batch)
    rollout = module.sample_rollout(batch)  # the same seed: the same completions
    logps, mask = own_token_logps(module.policy, rollout.sequences)
    advantages = grpo_advantages(rollout.rewards, 3, scale_rewards=module.hparams.scale_rewards).advantages
    ref = logps.detach() if module.hparams.beta > 0 else None  # the reference is the starting policy
    expected = grpo_loss(logps, None, ref, advantages, mask, loss_type=module.hparams.loss_type,
                         beta=module.hparams.beta, epsilon_high=module.hparams.epsilon_high,
                         importance_sampling_level=module.hparams.importance_sampling_level,
                         max_completion_length=10)
    torch.testing.assert_close(outputs.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert outputs.items == 12 and outputs.values["completions/mean_length"].shape == (12,)
    torch.testing.assert_close(outputs.values["reward"], rollout.rewards[:, 0])


def test_rloo_loss_and_advantages_on_the_modules_own_log_probs(prompts):
    module, batch = module_and_batch(prompts, RLOOModule, num_generations=3, beta=0.05)
    module.eval()
    outputs, _ = module.batch_outputs(batch)
    rollout = module.sample_rollout(batch)
    logps, mask = own_token_logps(module.policy, rollout.sequences)
    kl = torch.zeros(12)  # the sampling policy is the reference (no step yet)
    advantages = rloo_advantages(rollout.rewards, 3, kl=kl, beta=0.05).advantages
    expected = rloo_loss(logps, None, advantages, mask)
    torch.testing.assert_close(outputs.loss, expected.loss, rtol=1e-5, atol=1e-6)
    assert outputs.values["kl"].abs().max() < 1e-5


def not_built_again(self, *args, **kwargs):
    raise AssertionError(f"{type(self).__name__} built during a step")


@pytest.mark.parametrize("module_class, settings, advantages, loss", [
    (GRPOModule, dict(loss_type="grpo", beta=0.1, epsilon_high=0.28, scale_rewards="none"),
     GRPOAdvantages(3, (1.0,), "none", "sum_then_normalize"), GRPOLoss("grpo", 0.1, 0.2, 0.28, "token", 10)),
    (RLOOModule, dict(beta=0.05, normalize_advantages=True),
     RLOOAdvantages(3, (1.0,), 0.05, True), RLOOLoss(0.2, None)),
])
def test_the_module_builds_its_settings_once_and_its_steps_use_them(module_class, settings, advantages, loss,
                                                                    prompts, monkeypatch):
    module, batch = module_and_batch(prompts, module_class, num_generations=3, **settings)
    assert module.advantages == advantages and module.loss == loss
    for settings_class in (GRPOAdvantages, GRPOLoss, RLOOAdvantages, RLOOLoss):
        monkeypatch.setattr(settings_class, "__init__", not_built_again)
    module.eval()
    with torch.no_grad():
        outputs, _ = module.batch_outputs(batch)
    assert torch.isfinite(outputs.loss)


def test_a_rows_columns_reach_the_reward_function_and_none_gives_advantage_zero(prompts, tmp_path):
    rule = tmp_path / "answers.py"
    rule.write_text(
        "def by_answer(prompts, completions, answer, source, completion_ids):\n"
        "    assert source == ['demo'] * len(completions) and len(completion_ids) == len(completions)\n"
        "    return [None if int(a) % 4 == 0 else float(a) + len(c) % 2 for a, c in zip(answer, completions)]\n")
    module, batch = module_and_batch(prompts, num_generations=4, reward=f"{rule}:by_answer")
    assert batch.columns == [{"answer": str(i), "source": "demo"} for i in batch.index.tolist()]
    rollout = module.sample_rollout(batch)
    answers = torch.tensor([float(i) for i in batch.index.tolist()]).repeat_interleave(4)
    judged = answers % 4 != 0
    assert torch.isnan(rollout.rewards[:, 0]).equal(~judged)  # None: NaN, left out
    assert ((rollout.rewards[judged, 0] - answers[judged]) % 1 == 0).all()  # each its own row's answer
    stats, _ = module.policy_forward(rollout.sequences)
    module.add_advantages(rollout, stats)
    assert (rollout.advantages[~judged] == 0).all() and judged.any() and (~judged).any()
    expected = grpo_advantages(rollout.rewards, 4).advantages
    torch.testing.assert_close(rollout.advantages, expected)
    assert rollout.values["reward"].isnan().equal(~judged)


def test_entropy_per_token_from_the_full_and_the_chunked_head():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 11, bias=False)
    hidden = torch.randn(2, 6, 8)
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, -100, -100, -100]])
    full = stats_from_logits(head(hidden), labels, token_entropy=True)
    chunked = stats_from_hidden(hidden, head, labels, 2, token_entropy=True)
    probs = torch.softmax(head(hidden)[:, :-1], -1)[labels[:, 1:] != -100]
    torch.testing.assert_close(full.token_entropy, -(probs * probs.log()).sum(-1))
    torch.testing.assert_close(chunked.token_entropy, full.token_entropy)
    padded, mask = full.padded(full.token_entropy)
    assert mask.tolist() == [[True, True, True], [True, True, False]] and padded[1, 2] == 0


class GroupLog(L.Callback):
    """Each training step's prompts and, while its generation batch is kept for its next use, the rows of its
    completions: one JSON line per step and rank in ``<log>.<rank>``."""

    def __init__(self, log: str):
        self.path = log

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        key = tuple(batch.index.tolist())
        kept = module.rollouts.get(key)
        with open(f"{self.path}.{trainer.global_rank}", "a") as handle:
            handle.write(json.dumps({"step": trainer.global_step, "prompts": list(key), "completions": None if kept
                                     is None else kept.sequences.count}) + "\n")


@pytest.mark.parametrize("strategy", [
    pytest.param(["--trainer.strategy=ddp"], id="ddp"),
    pytest.param(["--config", str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=2",
                  "--model.beta=0.1"], id="fsdp2-beta", marks=pytest.mark.slow),
])
def test_two_processes_sample_whole_groups_per_rank_and_each_prompt_once(strategy, prompts, tmp_path):
    """2 processes (gloo), 4 prompts per rank and step, each generation batch used twice (num_iterations 2); under
    FSDP2 every rank generates in step with the sharded weights, and the reference copy is sharded too."""
    from test_distributed import launch

    log = tmp_path / "groups"
    launch("fit", "--config", str(CONFIGS / "grpo.yaml"), *strategy, f"--data.train={prompts}",
           f"--data.val={prompts}", "--model.num_generations=2", "--model.num_iterations=2",
           "--model.max_new_tokens=6", "--trainer.max_epochs=1", "--trainer.limit_val_batches=1",
           "--trainer.callbacks+=test_grpo.GroupLog", f"--trainer.callbacks.log={log}",
           f"--trainer.default_root_dir={tmp_path / 'run'}")
    steps = {rank: read_jsonl(f"{log}.{rank}") for rank in (0, 1)}
    assert [s["step"] for s in steps[0]] == [1, 2, 3, 4] == [s["step"] for s in steps[1]]
    for rank in (0, 1):
        first, second = steps[rank][0::2], steps[rank][1::2]
        assert [s["prompts"] for s in first] == [s["prompts"] for s in second]  # each batch twice in a row
        for step in first:  # kept after its first use, under its own prompts: a whole group of each
            assert step["completions"] == 2 * len(step["prompts"])
        assert all(s["completions"] is None for s in second)  # dropped after its second use
    used = [i for rank in (0, 1) for s in steps[rank][0::2] for i in s["prompts"]]
    assert sorted(used) == list(range(16))  # each prompt once in the epoch, across ranks
    rows = rows_of(tmp_path / "run" / "lightning_logs" / "version_0")
    assert [int(r["step"]) for r in rows if "train/reward" in r] == [0, 1, 2, 3]


class KillMidStep(L.Callback):
    """SIGKILLs every process of the fit after the gradients of optimizer step ``step`` (1-based), before the
    update; appends each trained step's prompts to ``log``."""

    def __init__(self, log: str, step: int = 0):
        self.path, self.step = log, step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        with open(self.path, "a") as handle:
            handle.write(json.dumps([trainer.global_step, batch.index.tolist()]) + "\n")

    def on_before_optimizer_step(self, trainer, module, optimizer):
        if self.step and trainer.global_step + 1 == self.step:
            os.killpg(0, signal.SIGKILL)


def test_num_iterations_resumes_its_kept_generation_batch_after_kill_9(prompts, tmp_path):
    """mu = 2: steps 1-2 train batch A, 3-4 batch B. Killed in step 4, the fit resumes from step 3's checkpoint,
    which holds B's generation batch after its first use, and ends with the weights of a fit never killed."""
    def args(root, *extra):
        return ["fit", "--config", str(CONFIGS / "grpo.yaml"), f"--data.train={prompts}", "--data.batch_size=4",
                "--model.num_iterations=2", "--model.num_generations=2", "--model.max_new_tokens=8",
                "--trainer.max_steps=6", "--trainer.limit_val_batches=0", f"--trainer.default_root_dir={root}",
                "--trainer.callbacks+=prefmodule.training.checkpoints.RunCheckpoint",
                "--trainer.callbacks.every_steps=1", "--trainer.callbacks+=test_grpo.KillMidStep",
                f"--trainer.callbacks.log={root / 'steps.jsonl'}", *QUIET, *extra]

    whole = main(args(tmp_path / "whole"))
    expected = load_file(Path(whole.trainer.log_dir) / "hf_model" / "model.safetensors")
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")])}
    root = tmp_path / "killed"
    killed = subprocess.run([sys.executable, "-m", "prefmodule", *args(root, "--trainer.callbacks.step=4")],
                            env=env, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "prefmodule", *args(root, "--ckpt_path=last")], env=env,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    steps = read_jsonl(root / "steps.jsonl")
    assert [step for step, _ in steps] == [1, 2, 3, 4, 5, 6]  # step 4 trained once, after the resume
    assert steps[2][1] == steps[3][1]  # batch B's second use came from the checkpoint
    exported = load_file(root / "lightning_logs" / "version_1" / "hf_model" / "model.safetensors")
    for name, weight in expected.items():
        torch.testing.assert_close(exported[name], weight, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("args, says", [
    (["--model.num_generations=1"], "model.num_generations=1: must be an integer >= 2"),
    (["--model.reward_weights=[1.0, 2.0]"], "model.reward_weights=[1.0, 2.0]: must be 1 finite number(s)"),
    (["--model.temperature=0"], "model.temperature=0"),
    (["--model.loss_type=ppo"], "model.loss_type='ppo'"),
    (["--model.reference=precomputed", "--model.beta=0.1"], "model.reference='precomputed'"),
    (["--model.reward=prefmodule.sampling.rules:no_such_rule"], "model.reward='prefmodule.sampling.rules:no_such"),
])
def test_bad_options_exit_2_with_one_line_before_any_weights_load(args, says, prompts, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        fit("grpo.yaml", prompts, tmp_path, *args)
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[-1].startswith("prefmodule: error: ") and says in lines[-1]
    assert not (tmp_path / "lightning_logs").exists() or not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("body, says", [
    ("raise KeyError('answer')", "failed on"),
    ("return [1.0]", "returned 1 scores for"),
    ("return [float('inf')] * len(completions)", "must be finite"),
])
def test_a_reward_function_that_fails_exits_2_naming_it(body, says, prompts, tmp_path, capsys):
    rule = tmp_path / "broken.py"
    rule.write_text(f"def broken(prompts, completions, **columns):\n    {body}\n")
    with pytest.raises(SystemExit) as exit_:
        fit("grpo.yaml", prompts, tmp_path, f"--model.reward={rule}:broken")
    assert exit_.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"prefmodule: error: reward function {rule}:broken ") and says in line
    assert " of row" in line  # the data rows of the batch's prompts (or of the completion at fault)


class PoisonedGRPO(GRPOModule):
    """GRPO whose loss is NaN at optimizer step 2 (1-based)."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 1 else loss


def test_the_non_finite_guard_skips_a_grpo_step(prompts, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from prefmodule.training.guard import NonFiniteGuard
    from test_guard import WeightsAfterEachStep

    module = PoisonedGRPO(model=TINY_MODEL, reward=POLITENESS, num_generations=2, max_new_tokens=6, lr=1e-3,
                          warmup=0)
    record = WeightsAfterEachStep()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, enable_progress_bar=False, limit_val_batches=0,
                        enable_model_summary=False, callbacks=[record], logger=CSVLogger(tmp_path), accelerator="cpu")
    trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=prompts, batch_size=4)))
    assert all(torch.equal(after, before) for after, before in zip(record.weights[1], record.weights[0]))
    assert not all(torch.equal(after, before) for after, before in zip(record.weights[2], record.weights[1]))
    guard = next(cb for cb in trainer.callbacks if isinstance(cb, NonFiniteGuard))
    assert guard.skipped == 1 and record.pairs[1] == sorted(record.pairs[1]) and len(record.pairs[1]) == 4
