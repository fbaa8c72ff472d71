"""Generated samples: held-out prompts completed before training and at each validation, equal to
Hugging Face's own ``generate`` on the same weights, scored with the objective's implicit reward, on one
process and under FSDP2, without changing what training computes."""

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from prefmodule import DPOModule, ORPOModule, PreferenceDataModule
from prefmodule.training.callbacks import SampleWriter
from prefmodule.cli import main
from prefmodule.errors import ConfigError
from prefmodule.paths import resolve
from prefmodule.outputs.samples import SampleSettings

from conftest import TINY_MODEL, read_jsonl

pytestmark = pytest.mark.samples  # the modules' default samples stay on here

CONFIGS = Path(__file__).parent.parent / "configs"


def rows_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def greedy(model, tokenizer, prompt: str, new_tokens: int) -> list[int]:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        output = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    completion = output[0, ids.shape[1]:].tolist()
    return completion[: completion.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in completion \
        else completion


def avg_logp(model, tokenizer, prompt: str, completion: list[int]) -> float:
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + completion])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    return logps[torch.arange(len(targets)), targets][len(prompt_ids) - 1:].mean().item()


def test_samples_before_and_at_each_validation_are_the_policy_greedy_completions(tmp_path, small_data):
    train, val = small_data
    cli = main(["fit", "--config", str(CONFIGS / "orpo.yaml"), f"--trainer.default_root_dir={tmp_path}",
                f"--data.train={train}", f"--data.val={val}", "--trainer.max_steps=2", "--trainer.val_check_interval=1",
                "--trainer.enable_progress_bar=false", "--data.batch_size=8", "--samples.num_prompts=3",
                "--samples.max_new_tokens=6", "--trainer.log_every_n_steps=1"])
    run_dir = Path(cli.trainer.log_dir)
    rows = rows_of(run_dir / "samples.jsonl")
    assert [row["step"] for row in rows] == [0] * 3 + [1] * 3 + [2] * 3
    val_rows = read_jsonl(val)
    assert len({row["prompt"] for row in rows}) == 3  # distinct prompts, the same three every time
    for row in rows:
        assert (row["prompt"], row["chosen"], row["rejected"]) == tuple(val_rows[row["index"]][k] for k in
                                                                        ("prompt", "chosen", "rejected"))
    tokenizer = cli.model.tokenizer
    start = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL)).eval()
    final = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model").eval()  # the weights of the last validation
    for model, step in ((start, 0), (final, 2)):
        for row in (r for r in rows if r["step"] == step):
            completion = greedy(model, tokenizer, row["prompt"], 6)
            assert row["completion"] == tokenizer.decode(completion, skip_special_tokens=True)
            # ORPO's implicit reward: beta times the completion's average log-probability
            assert row["reward"] == pytest.approx(0.1 * avg_logp(model, tokenizer, row["prompt"], completion), rel=1e-4)
    assert [r["completion"] for r in rows if r["step"] == 0] != [r["completion"] for r in rows if r["step"] == 2]
    report = (run_dir / "report.html").read_text()
    assert "before (step 0) vs after (step 2)" in report and report.count("data:image/png;base64,") == 7


class Modes(L.Callback):
    """What each training step starts from: the policy's mode and its ``use_cache`` setting."""

    def __init__(self):
        self.seen = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.seen.append((module.policy.training, module.policy.config.use_cache))


def test_samples_leave_a_seeded_run_unchanged(tmp_path, small_data):
    """Sampling draws random numbers and the policy has dropout: the random state, the modes and the weights after
    training are the same with samples on and off (DPO with precomputed reference log-probs: no reward for new text)."""
    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1024, attention_dropout=0.3)).save_pretrained(
        tmp_path / "dropout-llama")
    weights, rng = {}, {}
    for samples in (SampleWriter(num_prompts=2, max_new_tokens=4, temperature=1.0), SampleWriter(num_prompts=0)):
        on = samples.settings.num_prompts > 0
        L.seed_everything(0)
        module = DPOModule(model=str(tmp_path / "dropout-llama"), tokenizer=TINY_MODEL, lr=1e-2,
                           reference="precomputed", ref_cache_dir=str(tmp_path / "ref"))
        modes = Modes()
        root = tmp_path / str(on)
        L.Trainer(default_root_dir=root, max_steps=4, val_check_interval=2, enable_progress_bar=False,
                  enable_model_summary=False, callbacks=[modes, samples], logger=False, enable_checkpointing=False).fit(
            module, datamodule=module.connect(PreferenceDataModule(train=small_data[0], val=small_data[1],
                                                                   batch_size=8)))
        assert modes.seen == [(True, True)] * 4  # train mode; use_cache as the model has it (generate turns it on)
        weights[on] = {name: p.detach().clone() for name, p in module.policy.named_parameters()}
        rng[on] = torch.random.get_rng_state()
    for name, weight in weights[False].items():
        torch.testing.assert_close(weights[True][name], weight, rtol=0, atol=0)
    assert torch.equal(rng[True], rng[False])
    rows = rows_of(tmp_path / "True" / "samples.jsonl")
    assert [row["step"] for row in rows] == [0, 0, 2, 2, 4, 4] and all(row["reward"] is None for row in rows)
    assert not (tmp_path / "False" / "samples.jsonl").exists()


@pytest.mark.samples  # the defaults as a user has them
def test_sample_settings_are_checked_and_the_trainers_writer_is_kept():
    with pytest.raises(ConfigError, match="samples.temperature must be >= 0"):
        SampleWriter(temperature=-1)
    with pytest.raises(ConfigError, match=r"samples.num_prompts must be >= 0 \(0 turns the samples off\), got -1"):
        SampleWriter(num_prompts=-1)
    assert SampleWriter().settings == SampleSettings(num_prompts=4, max_new_tokens=64, temperature=0.0)
    module = ORPOModule(model=TINY_MODEL)
    assert [type(c) for c in module.configure_callbacks() if isinstance(c, SampleWriter)] == [SampleWriter]
    module.trainer = L.Trainer(callbacks=[SampleWriter(max_new_tokens=8)], logger=False)
    assert not [c for c in module.configure_callbacks() if isinstance(c, SampleWriter)]  # the trainer's stays


@pytest.mark.slow  # ~40 s each (the CI runs of tests/test_distributed.py turn samples off)
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_generate_what_one_would(strategy, tmp_path, small_data):
    """Every rank runs each forward (FSDP2 gathers its sharded weights there); rank 0 writes what one process
    would: Hugging Face's greedy completions of the starting and of the exported final weights."""
    from test_distributed import launch

    train, val = small_data
    setup = ["--config", str(CONFIGS / "strategies" / "fsdp2.yaml"), "--trainer.strategy.data_parallel_size=2"] \
        if strategy == "fsdp2" else ["--trainer.strategy=ddp"]
    launch("fit", "--config", str(CONFIGS / "dpo.yaml"), *setup, f"--data.train={train}", f"--data.val={val}",
           "--model.lr=1e-2", f"--trainer.default_root_dir={tmp_path}", "--trainer.max_steps=2",
           "--trainer.val_check_interval=2", "--samples.num_prompts=2", "--samples.max_new_tokens=6",
           samples=True)
    run_dir = tmp_path / "lightning_logs" / "version_0"
    rows = rows_of(run_dir / "samples.jsonl")
    assert [row["step"] for row in rows] == [0, 0, 2, 2]
    tokenizer = DPOModule(model=TINY_MODEL).tokenizer
    start = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL)).eval()
    final = AutoModelForCausalLM.from_pretrained(run_dir / "hf_model").eval()  # gathered after the last validation
    for model, step in ((start, 0), (final, 2)):
        for row in (r for r in rows if r["step"] == step):
            assert row["completion"] == tokenizer.decode(greedy(model, tokenizer, row["prompt"], 6),
                                                         skip_special_tokens=True)
    assert [row["reward"] for row in rows[:2]] == [0.0, 0.0]  # the policy still equals its reference
    assert all(row["reward"] != 0.0 for row in rows[2:])
