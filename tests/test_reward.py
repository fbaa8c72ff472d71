"""Reward models: the Bradley-Terry loss by hand and by gradient, ``validate`` equal to TRL's
``RewardTrainer.evaluate()``, packed equal to padded, predictions of pairs and rows, LoRA, and the export."""

import math
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from prefmodule import PreferenceDataModule, RewardModule
from prefmodule.cli import main
from prefmodule.data.collate import PreferenceCollator
from prefmodule.objectives.losses import bradley_terry_loss
from prefmodule.paths import resolve

from conftest import TINY_MODEL, read_jsonl, write_jsonl
from test_logps import packed

CONFIGS = Path(__file__).parent.parent / "configs"


# ----- the loss ------------------------------------------------------------------------------------------------
def test_bradley_terry_loss_by_hand():
    chosen, rejected = torch.tensor([1.0, -0.5]), torch.tensor([0.0, 0.5])
    margin = torch.tensor([0.5, 0.0])
    expected = [math.log(1 + math.exp(-(1.0 - 0.0 - 0.5))) + 0.01 * 1.0 ** 2,
                math.log(1 + math.exp(-(-0.5 - 0.5))) + 0.01 * 0.0 ** 2]
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected, margin, 0.01), torch.tensor(expected))
    torch.testing.assert_close(bradley_terry_loss(chosen, rejected), -torch.nn.functional.logsigmoid(chosen - rejected))


def test_bradley_terry_gradient_is_analytic_and_gradchecks():
    chosen = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64, requires_grad=True)
    rejected = torch.tensor([0.1, 0.4, -0.7], dtype=torch.float64, requires_grad=True)
    margin, c = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64), 0.05
    bradley_terry_loss(chosen, rejected, margin, c).sum().backward()
    p = torch.sigmoid(rejected - chosen + margin).detach()
    center = 2 * c * (chosen + rejected).detach()
    torch.testing.assert_close(chosen.grad, -p + center)
    torch.testing.assert_close(rejected.grad, p + center)
    assert torch.autograd.gradcheck(lambda w, l: bradley_terry_loss(w, l, margin, c), (chosen, rejected))


# ----- TRL parity -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_checkpoint(tmp_path_factory):
    """The tiny Llama with a seeded score head, saved as a reward model (what both frameworks load)."""
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(resolve(TINY_MODEL), num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 0.5)  # rewards that differ from pair to pair
    folder = tmp_path_factory.mktemp("reward")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve(TINY_MODEL)).save_pretrained(folder)
    return str(folder)


def trl_evaluate(folder, rows, tmp_path, **config):
    from datasets import Dataset
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(output_dir=str(tmp_path / "trl"), per_device_eval_batch_size=len(rows), report_to="none",
                        use_cpu=True, bf16=False, disable_tqdm=True, max_length=256, **config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(model=folder, args=args, train_dataset=Dataset.from_list(rows),
                                eval_dataset=Dataset.from_list(rows))
        return trainer.evaluate()


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_validate_equals_trl_reward_trainer_evaluate(kind, reward_checkpoint, demo_rows, tmp_path):
    if kind == "standard":
        rows = [{**row, "margin": [0.0, 0.5, 1.5][i % 3]} for i, row in enumerate(demo_rows[:7])]
    else:
        rows = read_jsonl(resolve("asset://demo/conversational.jsonl"))[:7]
    config = dict(center_rewards_coefficient=0.01)
    theirs = trl_evaluate(reward_checkpoint, rows, tmp_path, **config)
    module = RewardModule(model=reward_checkpoint, **config)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = PreferenceDataModule(val=write_jsonl(tmp_path / "val.jsonl", rows), batch_size=8, max_length=256,
                                cache_dir=str(tmp_path / "cache"))  # one batch holds the file, as in TRL
    ours = trainer.validate(module, datamodule=module.connect(data), verbose=False)[0]
    for name in ("loss", "accuracy", "margin", "min_reward", "mean_reward", "max_reward"):
        assert ours[f"val/{name}"] == pytest.approx(theirs[f"eval_{name}"], rel=1e-3, abs=1e-5), name
    assert 0 < theirs["eval_accuracy"] < 1 and theirs["eval_max_reward"] > theirs["eval_min_reward"]


# ----- the module -----------------------------------------------------------------------------------------------
def test_packed_rewards_and_gradients_equal_padded(reward_checkpoint, demo_rows):
    from test_logps import a_batch, relative_error

    module = RewardModule(model=reward_checkpoint)
    module.configure_model()
    module.policy.eval()
    padded = a_batch(module, demo_rows[:5])
    results = []
    for batch in (padded, packed(padded)):
        module.policy.zero_grad()
        rewards, _ = module.rewards(batch.sequences)
        (rewards * torch.linspace(-1, 2, len(rewards))).sum().backward()
        results.append((rewards.detach(), {n: p.grad.clone() for n, p in module.policy.named_parameters()}))
    (padded_rewards, padded_grads), (packed_rewards, packed_grads) = results
    assert padded_rewards.shape == (10,) and padded_rewards.std() > 0
    torch.testing.assert_close(packed_rewards, padded_rewards, rtol=1e-5, atol=1e-5)
    for name, grad in padded_grads.items():
        assert relative_error(packed_grads[name], grad) < 1e-5, name
    with torch.no_grad():  # the model's own pooling: the last non-padding token of each sequence
        inputs = padded.sequences
        own = module.policy(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).logits[:, 0]
    torch.testing.assert_close(padded_rewards, own, rtol=1e-5, atol=1e-6)


def test_reward_yaml_fits_the_export_reloads_with_the_same_scores_and_predict_writes_them(tmp_path, demo_rows):
    rows = [{"prompt": r["prompt"], "completion": r["chosen"], "label": True} for r in demo_rows[20:23]]
    unpaired = write_jsonl(tmp_path / "rows.jsonl", rows)
    common = ["--config", str(CONFIGS / "reward.yaml"), f"--trainer.default_root_dir={tmp_path}",
              "--trainer.enable_progress_bar=false", f"--data.cache_dir={tmp_path / 'cache'}"]
    cli = main(["fit", *common, "--trainer.max_steps=4", "--trainer.val_check_interval=4",
                "--trainer.limit_val_batches=2"])
    trainer, module = cli.trainer, cli.model
    metrics = trainer.callback_metrics
    assert trainer.global_step == 4 and metrics["val/accuracy"] > 0.5 and math.isfinite(metrics["train/loss"])
    exported = Path(trainer.log_dir) / "hf_model"
    card = (exported / "README.md").read_text()
    assert "AutoModelForSequenceClassification" in card and "pipeline_tag: text-classification" in card
    reloaded = AutoModelForSequenceClassification.from_pretrained(exported).eval()
    batch = PreferenceCollator(module.tokenizer.pad_token_id)([cli.datamodule.datasets["val"][i] for i in range(4)])
    module.policy.eval()
    with torch.no_grad():
        ours, _ = module.rewards(batch.sequences)
        sequences = batch.sequences
        theirs = reloaded(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits[:, 0]
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)

    checkpoint = str(Path(trainer.log_dir) / "checkpoints" / "last.ckpt")
    main(["predict", *common, f"--ckpt_path={checkpoint}", f"--predictions.path={tmp_path / 'pairs.jsonl'}"])
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert len(pairs) == 200 and set(pairs[0]) == {"index", "chosen_reward", "rejected_reward", "preferred"}
    main(["predict", *common, f"--ckpt_path={checkpoint}", f"--data.predict={unpaired}",
          f"--predictions.path={tmp_path / 'scored.jsonl'}"])  # not rows.jsonl, the data it reads
    scored = read_jsonl(tmp_path / "scored.jsonl")
    assert [row["index"] for row in scored] == [0, 1, 2] and all(math.isfinite(row["reward"]) for row in scored)


def test_lora_trains_the_adapters_and_the_new_score_head_and_exports_merged(tmp_path, small_data):
    train, val = small_data
    module = RewardModule(model=TINY_MODEL, lr=1e-2, lora={"r": 4, "lora_alpha": 8})
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, val_check_interval=2, enable_progress_bar=False,
                        enable_model_summary=False, logger=False)
    before = {n: p.detach().clone() for n, p in AutoModelForSequenceClassification.from_pretrained(
        resolve(TINY_MODEL), num_labels=1).named_parameters() if "score" not in n}
    trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, val=val, batch_size=4)))
    assert isinstance(module.policy, PeftModel)
    trained = {n for n, p in module.policy.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "score" in n for n in trained) and any("score" in n for n in trained)
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf_model")
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    moved = [n for n, p in merged.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert moved  # the adapters were merged into the base weights
    assert merged.config.num_labels == 1


@pytest.mark.parametrize("strategy", [
    pytest.param(["--config", str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=2",
                  "--trainer.strategy.save_distributed_checkpoint=false"], id="fsdp2"),
    pytest.param(["--trainer.strategy=ddp"], id="ddp", marks=pytest.mark.slow),
])
def test_two_processes_train_agree_with_one_and_export_the_whole_reward_model(strategy, tmp_path, small_data):
    """Sharded (FSDP2: the score head a unit of its own) or replicated: validation over both ranks equals one
    process on the same weights, and the export is the whole model of the checkpoint."""
    from test_distributed import assert_same_metrics, launch, logged_val, validate_on_one_process

    train, val = small_data
    launch("fit", "--config", str(CONFIGS / "reward.yaml"), *strategy, f"--data.train={train}", f"--data.val={val}",
           f"--trainer.default_root_dir={tmp_path / 'two'}", "--trainer.max_steps=2", "--trainer.val_check_interval=2",
           "--trainer.max_epochs=1")
    log_dir = tmp_path / "two" / "lightning_logs" / "version_0"
    ckpt = log_dir / "checkpoints" / "last.ckpt"
    assert_same_metrics(logged_val(log_dir), validate_on_one_process("reward.yaml", val, ckpt, tmp_path / "one"),
                        logged=("val/loss", "val/accuracy", "val/margin", "val/min_reward", "val/max_reward"))
    exported = AutoModelForSequenceClassification.from_pretrained(log_dir / "hf_model")
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, state[f"policy.{name}"], rtol=0, atol=0, msg=name)
