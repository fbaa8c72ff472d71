"""On-policy preference data: pairs sampled from a policy and scored (``configs/sample_pairs.yaml``), the reward
model and the rule as scorers, iterative DPO, and Online DPO (``configs/online_dpo.yaml``)."""

import csv
import json
import sys
from pathlib import Path

import pytest
import torch

from prefmodule import OnlineDPOModule, PreferenceDataModule, RewardModule, SamplePairsModule
from prefmodule.cli import main
from prefmodule.data.collate import PreferenceCollator
from prefmodule.errors import ConfigError
from prefmodule.paths import resolve
from prefmodule.sampling.pairs import PairsWriter
from prefmodule.sampling.rules import politeness
from prefmodule.sampling.scorers import RewardModelScorer, make_scorer

from conftest import TINY_MODEL, read_jsonl, write_jsonl

CONFIGS = Path(__file__).parent.parent / "configs"
SCRIPTS = Path(__file__).parent.parent / "scripts"
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--trainer.accelerator=cpu"]


@pytest.fixture
def prompts(tmp_path, demo_rows):
    """12 distinct prompts alone (the ``prompts`` format), and the same as chat messages."""
    texts = list(dict.fromkeys(row["prompt"] for row in demo_rows))[:12]
    return (write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": text} for text in texts]),
            write_jsonl(tmp_path / "chat_prompts.jsonl",
                        [{"prompt": [{"role": "user", "content": text}]} for text in texts]), texts)


def sample(tmp_path, data, *args):
    cli = main(["predict", "--config", str(CONFIGS / "sample_pairs.yaml"), f"--data.predict={data}",
                f"--trainer.default_root_dir={tmp_path}", "--model.max_new_tokens=12", *QUIET, *args])
    writer = next(c for c in cli.trainer.callbacks if isinstance(c, PairsWriter))
    return writer.summary, read_jsonl(writer.summary["path"])


def test_sample_pairs_yaml_keeps_best_vs_worst_and_the_file_trains_dpo(tmp_path, prompts):
    path, _, texts = prompts
    summary, pairs = sample(tmp_path / "sampled", path)
    assert summary["prompts"] == 12 and summary["completions_per_prompt"] == 4
    assert summary["pairs"] + summary["ties"] + summary["empty"] == 12 and summary["pairs"] > summary["ties"]
    assert summary["path"] == str(tmp_path / "sampled" / "lightning_logs" / "version_0" / "pairs.jsonl")
    assert len({pair["prompt"] for pair in pairs}) == len(pairs) and {p["prompt"] for p in pairs} <= set(texts)
    for pair in pairs:  # the scores kept are the rule's own, chosen above rejected
        scored = politeness([pair["prompt"]] * 2, [pair["chosen"], pair["rejected"]])
        assert scored == pytest.approx([pair["score_chosen"], pair["score_rejected"]], abs=1e-6)
        assert pair["score_chosen"] > pair["score_rejected"] and pair["chosen"].strip() and pair["rejected"].strip()
    again, same = sample(tmp_path / "again", path)  # seeded: the same pairs
    assert same == pairs
    cli = main(["fit", "--config", str(CONFIGS / "dpo.yaml"), f"--data.train={summary['path']}",
                f"--data.val={summary['path']}", "--trainer.max_steps=1", "--samples.num_prompts=0", "--export.enabled=false",
                f"--trainer.default_root_dir={tmp_path / 'dpo'}", *QUIET])
    assert cli.trainer.global_step == 1 and "val/rewards/accuracies" in cli.trainer.callback_metrics  # as it is


def test_chat_prompts_give_pairs_of_assistant_messages(tmp_path, prompts):
    _, chat, texts = prompts
    _, pairs = sample(tmp_path, chat, "--model.num_completions=3")
    assert pairs and all(pair["prompt"][-1]["content"] in texts for pair in pairs)
    assert all(pair["chosen"][0]["role"] == "assistant" and len(pair["rejected"]) == 1 for pair in pairs)


def test_a_reward_model_scores_as_the_reward_module_it_was_trained_as(tmp_path, demo_rows):
    module = RewardModule(model=TINY_MODEL)
    module.configure_model()
    with torch.no_grad():
        module.policy.score.weight.normal_(0, 0.5)
    module.export_hf(str(tmp_path / "reward"))
    rows = demo_rows[:3]
    scorer = make_scorer(str(tmp_path / "reward"))
    assert isinstance(scorer, RewardModelScorer)
    scores = scorer([row["prompt"] for row in rows], [row["chosen"] for row in rows])
    data = PreferenceDataModule(train=write_jsonl(tmp_path / "rows.jsonl", rows), tokenizer=TINY_MODEL,
                                cache_dir=str(tmp_path / "cache"))
    data.setup("fit")
    batch = PreferenceCollator(module.tokenizer.pad_token_id)([data.datasets["train"][i] for i in range(3)])
    module.policy.eval()
    with torch.no_grad():
        rewards, _ = module.rewards(batch.sequences)
    torch.testing.assert_close(torch.tensor(scores), rewards[:3], rtol=1e-5, atol=1e-5)


def test_scorer_names_are_checked(tmp_path):
    with pytest.raises(ConfigError, match="cannot import it"):
        make_scorer("prefmodule.sampling.rules:nothing")
    with pytest.raises(ConfigError, match="not a folder, a .ckpt, or a function"):
        make_scorer("no-such-thing")
    rule = tmp_path / "my_rule.py"
    rule.write_text("def length(prompts, completions):\n    return [len(c) for c in completions]\n")
    assert make_scorer(f"{rule}:length")(["p", "p"], ["ab", "abcd"]) == [2.0, 4.0]
    bad = tmp_path / "bad_rule.py"
    bad.write_text("def nan(prompts, completions):\n    return [float('nan')] * len(completions)\n")
    with pytest.raises(ValueError, match=f"reward function {bad}:nan returned nan for completion 1 of 1: a score must "
                                         "be finite"):
        make_scorer(f"{bad}:nan")(["p"], ["a"])


def test_iterative_dpo_runs_two_rounds_and_the_held_out_reward_rises(tmp_path, demo_rows):
    sys.path.insert(0, str(SCRIPTS))
    from iterative_dpo import main as iterate

    train = write_jsonl(tmp_path / "train.jsonl", [{"prompt": p} for p in dict.fromkeys(r["prompt"] for r in demo_rows)])
    held_out = write_jsonl(tmp_path / "held_out.jsonl",
                           [{"prompt": r["prompt"]} for r in read_jsonl(resolve("asset://demo/val.jsonl"))[:48]])
    records = iterate(["--rounds", "2", "--prompts", train, "--held-out", held_out, "--out", str(tmp_path / "runs"),
                       "--sample-args=--model.max_new_tokens=24"])
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[0]["policy"] == TINY_MODEL and records[1]["policy"].endswith("hf_model")
    assert records[1]["policy"] != records[2]["policy"] and 0 < records[1]["sampled_tokens"] < records[2]["sampled_tokens"]
    rewards = [r["held_out_mean_reward"] for r in records]
    assert rewards[2] > rewards[1] > rewards[0]  # each round's policy scores higher on prompts it never trained on
    assert json.loads((tmp_path / "runs" / "rounds.json").read_text()) == records


# ----- Online DPO ---------------------------------------------------------------------------------------------
def test_online_dpo_yaml_fits_and_logs_trls_metrics(tmp_path, prompts):
    path, _, _ = prompts
    cli = main(["fit", "--config", str(CONFIGS / "online_dpo.yaml"), f"--data.train={path}", f"--data.val={path}",
                "--data.batch_size=4", "--trainer.max_steps=3", "--trainer.max_epochs=1", "--trainer.log_every_n_steps=1",
                "--model.max_new_tokens=12", "--samples.num_prompts=0", f"--trainer.default_root_dir={tmp_path}", *QUIET])
    rows = list(csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv")))
    train = [r for r in rows if r.get("train/objective/kl")]
    assert [int(r["step"]) for r in train] == [0, 1, 2]
    assert float(train[0]["train/objective/kl"]) == pytest.approx(0.0, abs=1e-5)  # the policy is its reference
    assert float(train[-1]["train/objective/kl"]) != 0.0  # until it trains
    for row in train:
        assert float(row["train/objective/scores_margin"]) >= 0  # the better completion is the chosen one
        assert float(row["train/objective/entropy"]) > 0 and row["train/contain_eos_token"]
    assert float(train[-1]["train/sampled_tokens"]) > 0
    val = next(r for r in rows if r.get("val/objective/scores"))
    assert {"val/rewards/accuracies", "val/objective/scores_margin", "val/logps/chosen"} <= {k for k, v in val.items() if v}


def test_sampling_leaves_training_as_it_was(prompts):
    path, _, _ = prompts
    module = OnlineDPOModule(model=TINY_MODEL, reward="prefmodule.sampling.rules:politeness", max_new_tokens=8)
    data = PreferenceDataModule(predict=path, batch_size=4)
    import lightning as L

    trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    module.trainer = trainer
    module.configure_model()
    data.connect(module.batch_format())
    data.trainer = trainer
    batch = next(iter(data.predict_dataloader()))
    module.train()
    state = torch.get_rng_state()
    pairs = module.sampled_pairs(batch)
    assert torch.equal(torch.get_rng_state(), state) and module.policy.training and not module.ref_model.training
    assert pairs.sequences.input_ids.requires_grad is False and all(p.grad is None for p in module.policy.parameters())
    assert (pairs.score_chosen >= pairs.score_rejected).all() and pairs.index.tolist() == batch.index.tolist()
    again = module.sampled_pairs(batch)  # seeded by the batch and the step: the same completions
    assert torch.equal(again.sequences.input_ids, pairs.sequences.input_ids)


@pytest.mark.parametrize("padding_free", [True, False])
def test_online_dpo_lays_out_its_sampled_pairs_as_the_data_says(padding_free, prompts):
    path, _, _ = prompts
    module = OnlineDPOModule(model=TINY_MODEL, reward="prefmodule.sampling.rules:politeness", max_new_tokens=4)
    data = PreferenceDataModule(predict=path, batch_size=4, padding_free=padding_free)
    import lightning as L

    module.trainer = L.Trainer(logger=False, enable_progress_bar=False, accelerator="cpu")
    data.trainer = module.trainer
    module.trainer.datamodule = module.connect(data)  # its collator comes back, packing asked once models are placed
    module.configure_model()
    pairs = module.sampled_pairs(next(iter(data.predict_dataloader())))
    assert pairs.sequences.packed is padding_free
    assert pairs.sequences.input_ids.shape[0] == (1 if padding_free else 8)  # 4 prompts, 2 completions each


def test_online_dpo_refuses_a_precomputed_reference():
    with pytest.raises(ConfigError, match="precomputed"):
        OnlineDPOModule(model=TINY_MODEL, reward="prefmodule.sampling.rules:politeness", reference="precomputed")


@pytest.mark.parametrize("module", [OnlineDPOModule, SamplePairsModule])
def test_a_missing_reward_model_fails_when_the_module_is_built(module, tmp_path):
    """Before any weights or data load: a reward model is checked by name when the module is built, not loaded."""
    with pytest.raises(ConfigError, match="model.reward=.*not a folder, a .ckpt, or a function"):
        module(model=TINY_MODEL, reward=str(tmp_path / "no-such-reward-model"))


@pytest.mark.parametrize("strategy", [
    pytest.param(["--config", str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=2"],
                 id="fsdp2"),
    pytest.param(["--trainer.strategy=ddp"], id="ddp", marks=pytest.mark.slow),
])
def test_online_dpo_and_sampled_pairs_on_two_processes(strategy, tmp_path, prompts):
    """Sharded generation (every rank generates in step) or replicated; each rank samples its share of the
    prompts, and the pairs file holds each prompt once."""
    from test_distributed import launch

    path, _, texts = prompts
    launch("fit", "--config", str(CONFIGS / "online_dpo.yaml"), *strategy, f"--data.train={path}",
           f"--data.val={path}", "--trainer.max_steps=2", "--trainer.max_epochs=1", "--model.max_new_tokens=8",
           f"--trainer.default_root_dir={tmp_path / 'online'}")
    rows = list(csv.DictReader(open(tmp_path / "online" / "lightning_logs" / "version_0" / "metrics.csv")))
    assert [int(r["step"]) for r in rows if r.get("train/objective/kl")] == [0, 1]
    launch("predict", "--config", str(CONFIGS / "sample_pairs.yaml"), *strategy, f"--data.predict={path}",
           "--model.max_new_tokens=8", f"--model.pairs_path={tmp_path / 'pairs.jsonl'}",
           f"--trainer.default_root_dir={tmp_path / 'sampled'}")
    pairs = read_jsonl(tmp_path / "pairs.jsonl")
    assert pairs and len({pair["prompt"] for pair in pairs}) == len(pairs) and {p["prompt"] for p in pairs} <= set(texts)


def test_prompts_alone_cannot_train_a_paired_objective(tmp_path, prompts, capsys):
    path, _, _ = prompts
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), f"--data.train={path}", "--samples.num_prompts=0",
              f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}", *QUIET])
    assert exit.value.code == 2
    error = capsys.readouterr().err
    assert "prompts rows hold prompts without responses, and DPOModule trains on responses" in error
