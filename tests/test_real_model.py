"""A real pretrained chat model: SmolLM2-135M-Instruct, converted once from the package index
(``scripts/real_assets.py``; ChatML, ``pad_token`` = ``eos_token`` = ``<|im_end|>``, tied embeddings). DPO, ORPO and
KTO train a few steps on the shipped conversational data; every response's end token is trained, the model still
ends its answers with it, and the export reloads and still knows the capital of France. Minutes on 2 CPU cores:
``slow``; skipped, with the reason, where the package index cannot be reached."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefmodule.cli import main
from prefmodule.models.generation import end_tokens, generate

from prefmodule.paths import resolve

from conftest import read_jsonl

sys.path.insert(0, str(Path(__file__).parent.parent / "scripts"))
from real_assets import Unavailable, smollm2_folder  # noqa: E402

pytestmark = pytest.mark.slow
CONVERSATIONS = "asset://demo/conversational.jsonl"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
# Questions the starting model answers in a sentence, ending with <|im_end|> well within 48 tokens.
SHORT = [QUESTION] + [[{"role": "user", "content": q}] for q in
                      ("What is 2 + 2?", "Name one planet of the solar system.", "How many days are in a week?")]


@pytest.fixture(scope="module")
def smollm2():
    try:
        return smollm2_folder()
    except Unavailable as error:
        pytest.skip(f"SmolLM2-135M-Instruct cannot be made here: {error}")


def answers(folder: str, conversations: list[list[dict]], max_new_tokens: int = 48):
    """Greedy completions of ``conversations`` by the model saved in ``folder`` (token ids), its tokenizer and model."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
               for c in conversations]
    return generate(model, tokenizer, prompts, max_new_tokens), tokenizer, model


def test_the_converted_model_is_smollm2_instruct(smollm2):
    completions, tokenizer, model = answers(smollm2, SHORT)
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.num_parameters() == 134_515_008
    assert tokenizer.decode(completions[0]) == "The capital of France is Paris.<|im_end|>"
    assert all(completion[-1] == tokenizer.eos_token_id for completion in completions)


@pytest.mark.parametrize("objective", ["DPOModule", "ORPOModule", "KTOModule"])
def test_fit_trains_the_end_token_keeps_it_and_the_export_still_knows_paris(objective, smollm2, tmp_path):
    cli = main(["fit", f"--model=prefmodule.{objective}", f"--model.model={smollm2}", "--model.lr=1e-6",
                "--model.warmup=0", f"--data.train={CONVERSATIONS}", f"--data.val={CONVERSATIONS}",
                "--data.batch_size=2", "--data.max_length=256", "--trainer.max_steps=3", "--trainer.val_check_interval=3",
                "--trainer.limit_val_batches=2", "--trainer.log_every_n_steps=1", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={tmp_path}", "--samples.num_prompts=2",
                "--samples.max_new_tokens=32"])
    trainer, module = cli.trainer, cli.model
    assert trainer.global_step == 3 and torch.isfinite(trainer.callback_metrics["val/loss"])

    # Every response of a training batch ends with <|im_end|> among its trained (labelled) tokens, once.
    batch = next(iter(cli.datamodule.train_dataloader()))
    eos = module.tokenizer.eos_token_id
    assert eos == module.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert int((batch.sequences.labels == eos).sum()) == batch.sequences.count

    # The samples show each chat prompt by its last user message.
    rows = read_jsonl(resolve(CONVERSATIONS))
    samples = read_jsonl(f"{trainer.log_dir}/samples.jsonl")
    last_messages = {row["prompt"][-1]["content"] for row in rows}
    assert samples and all(sample["message"] in last_messages for sample in samples)

    # The export is the trained policy, ends its answers with <|im_end|> and knows the capital of France.
    exported = f"{trainer.log_dir}/hf_model"
    with safe_open(f"{exported}/model.safetensors", "pt") as moved, safe_open(f"{smollm2}/model.safetensors",
                                                                                "pt") as start:
        name = "model.layers.0.mlp.down_proj.weight"
        assert not torch.equal(moved.get_tensor(name), start.get_tensor(name))
    completions, tokenizer, model = answers(exported, SHORT)
    assert "Paris" in tokenizer.decode(completions[0])
    stops = end_tokens(model, tokenizer)
    assert all(completion[-1] in stops for completion in completions), [tokenizer.decode(c) for c in completions]


@pytest.mark.parametrize("head", ["causal_lm", "reward"])
def test_the_real_model_takes_packed_rows_as_a_policy_and_as_a_reward_model(head, smollm2):
    """SmolLM2's residual stream reaches 55: the probe compares log-probs and scores relative to their scale, so
    packing holds (an absolute 1e-4 on hidden states turned it off on some CPUs, +36% memory, silently)."""
    from transformers import AutoModelForSequenceClassification

    from prefmodule.models.attention import VARLEN_SDPA, enable_packed_attention

    loader = AutoModelForCausalLM if head == "causal_lm" else AutoModelForSequenceClassification
    model = loader.from_pretrained(smollm2, **({} if head == "causal_lm" else {"num_labels": 1}))
    packing = enable_packed_attention(model)
    assert packing and packing.reason is None and model.config._attn_implementation == VARLEN_SDPA


def recorded_smollm2_memory_mb() -> float:
    """The packed DPO step's peak memory that BENCHMARKS.md records for SmolLM2-135M-Instruct."""
    text = (Path(__file__).parent.parent / "BENCHMARKS.md").read_text()
    section = text[text.index("## A real pretrained model: SmolLM2-135M-Instruct"):]
    row = next(line for line in section.splitlines() if line.startswith("| dpo | prefmodule (packed) |"))
    return float(row.split("|")[6].replace(",", ""))  # the peak memory (MB) column


def test_the_real_model_step_is_packed_and_within_its_recorded_memory(smollm2, tmp_path):
    """The guard of the real-model figures: ``scripts/benchmark.py --model smollm2`` (prefmodule alone, the
    BENCHMARKS.md command's shape) must run packed batches, at most 10% above the recorded peak memory."""
    import benchmark

    results = benchmark.main(["--model", "smollm2", "--data", "sharegpt", "--objectives", "dpo", "--frameworks",
                              "prefmodule", "--batch-size", "4", "--max-length", "1024", "--steps", "1",
                              "--warmup-steps", "1", "--json", str(tmp_path / "smollm2.json")])
    (run,) = results["runs"]
    assert run["packed"] is True, "the real-model DPO step ran padded batches"
    assert run["peak_memory_mb"] <= 1.10 * recorded_smollm2_memory_mb(), (run["peak_memory_mb"],
                                                                           recorded_smollm2_memory_mb())


def test_grpo_with_an_exact_match_reward_teaches_the_real_model_one_digit_arithmetic(smollm2, tmp_path):
    """The README's verifiable-reward walk, short: 12 GRPO steps (4 problems x 8 completions) of
    ``configs/recipes/grpo_smollm2_arithmetic.yaml`` raise SmolLM2's greedy held-out accuracy from 16 of 30 and
    shorten its answers (the whole 30-step recipe: 30 of 30, README)."""
    import arithmetic_accuracy

    before = arithmetic_accuracy.accuracy(smollm2, "asset://arithmetic/val_one_digit.jsonl")
    recipe = Path(__file__).parent.parent / "configs" / "recipes" / "grpo_smollm2_arithmetic.yaml"
    cli = main(["fit", "--config", str(recipe), f"--model.model={smollm2}",
                "--trainer.max_epochs=1", "--trainer.max_steps=12", "--trainer.limit_val_batches=0",
                f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"])
    after = arithmetic_accuracy.accuracy(str(Path(cli.trainer.log_dir) / "hf_model"),
                                         "asset://arithmetic/val_one_digit.jsonl")
    assert cli.trainer.global_step == 12
    assert before["accuracy"] == 16 / 30
    # measured: 23 of 30 right after the 12 steps, 21.9 tokens per answer against 36.3
    assert after["accuracy"] >= 21 / 30 and after["mean_tokens"] < 0.75 * before["mean_tokens"], (before, after)
