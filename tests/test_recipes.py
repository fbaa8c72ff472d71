"""Every recipe in configs/recipes parses with the real model names, and trains 2 steps with the model
swapped for a tiny one of the same architecture and the data for the shipped demo."""

from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config, LlamaConfig, Qwen2Config

from prefmodule.cli import main
from prefmodule.paths import resolve

from conftest import TINY_MODEL, read_jsonl, write_jsonl
from test_architectures import DECODER

RECIPES = Path(__file__).parent.parent / "configs" / "recipes"
STAND_INS = {  # the recipe's model -> a tiny config of its architecture (tied as the real one is)
    "Qwen/Qwen2.5-0.5B-Instruct": lambda: Qwen2Config(**DECODER, tie_word_embeddings=True),
    "meta-llama/Llama-3.2-1B-Instruct": lambda: LlamaConfig(**DECODER, tie_word_embeddings=True),
    "google/gemma-2-2b-it": lambda: Gemma2Config(**DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                                 final_logit_softcapping=30.0, tie_word_embeddings=True),
    "meta-llama/Llama-3.1-8B-Instruct": lambda: LlamaConfig(**DECODER),
    "HuggingFaceTB/SmolLM2-135M-Instruct": lambda: LlamaConfig(**DECODER, tie_word_embeddings=True),
    # the same model, converted from the package index by scripts/real_assets.py
    "~/.cache/prefmodule/models/SmolLM2-135M-Instruct": lambda: LlamaConfig(**DECODER, tie_word_embeddings=True),
}
ON_A_CPU = {"smollm2-135m-dpo-cpu.yaml"}  # the recipes that run on a CPU: float32, shorter pairs
ON_PROMPTS = {"grpo_smollm2_arithmetic.yaml"}  # on a CPU too, sampling completions of prompts
ON_CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.max_steps=2", "--trainer.max_epochs=1",
          "--trainer.accumulate_grad_batches=1",
          "--trainer.val_check_interval=2", "--trainer.limit_val_batches=1", "--trainer.enable_progress_bar=false",
          "--trainer.enable_model_summary=false", "--data.batch_size=2", "--data.max_length=128",
          "--data.max_prompt_length=64"]


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    """The shipped demo's first pairs, and one tokenisation cache for all recipes (they share the tokenizer)."""
    folder = tmp_path_factory.mktemp("demo")
    rows = read_jsonl(resolve("asset://demo/train.jsonl"))
    return [f"--data.train={write_jsonl(folder / 'train.jsonl', rows[:8])}",
            f"--data.val={write_jsonl(folder / 'val.jsonl', rows[8:10])}", f"--data.cache_dir={folder / 'cache'}"]


def recipe_names():
    return sorted(path.name for path in RECIPES.glob("*.yaml"))


def test_the_recipes_cover_the_models_people_start_with():
    models = {yaml.safe_load((RECIPES / name).read_text())["model"]["init_args"]["model"] for name in recipe_names()}
    assert models == STAND_INS.keys() and len(recipe_names()) == 7


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_parses_with_the_fields_hyperparameters(name, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(RECIPES / name), "--print_config"])
    config = yaml.safe_load(capsys.readouterr().out)
    model = config["model"]["init_args"]
    if name in ON_A_CPU:
        assert config["trainer"]["accelerator"] == "cpu" and config["trainer"]["precision"] == "32-true"
        assert config["data"]["max_length"] == 1024 and config["data"]["batch_size"] == 4
    elif name in ON_PROMPTS:
        assert config["trainer"]["accelerator"] == "cpu" and config["trainer"]["precision"] == "32-true"
        assert model["num_generations"] == 8 and model["reward"] == "prefmodule.sampling.rules:exact_match"
        assert model["beta"] == 0.0 and config["data"]["train"] == "asset://arithmetic/train_one_digit.jsonl"
    else:
        assert config["trainer"]["precision"] == "bf16-mixed" and model["gradient_checkpointing"] is True
        assert config["data"]["max_length"] == 2048
    if model["lora"]:
        assert model["lr"] == 5e-6 and model["lora"]["r"] == 16
    if config["model"]["class_path"] == "prefmodule.DPOModule":
        assert model["beta"] == 0.1 and model["lr"] == (5e-6 if model["lora"] else 5e-7)


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_trains_two_steps_on_a_tiny_model_of_its_architecture(name, tmp_path, demo_data):
    recipe = yaml.safe_load((RECIPES / name).read_text())
    folder = tmp_path / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(STAND_INS[recipe["model"]["init_args"]["model"]]()).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve(TINY_MODEL)).save_pretrained(folder)
    sharded = "strategy" in recipe["trainer"]
    data = demo_data if name not in ON_PROMPTS else [  # its rewards read the arithmetic rows' answers
        *demo_data[2:], "--data.eval_batch_size=2", "--model.max_new_tokens=16", "--model.num_generations=2",
        "--trainer.check_val_every_n_epoch=1"]  # the recipe validates once, after its 2 epochs
    cli = main(["fit", "--config", str(RECIPES / name), f"--model.model={folder}", *ON_CPU, *data,
                f"--trainer.default_root_dir={tmp_path / 'run'}",
                *(["--trainer.strategy.data_parallel_size=1"] if sharded else [])])
    assert cli.trainer.global_step == 2
    assert torch.isfinite(cli.trainer.callback_metrics["val/loss"])
    exported = AutoModelForCausalLM.from_pretrained(Path(cli.trainer.log_dir) / "hf_model")
    assert not [n for n, _ in exported.named_parameters() if "lora" in n]
