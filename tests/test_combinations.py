"""Every feature with every other: each objective on a dense and a mixture-of-experts model (whose config asks for
router logits, as fine-tuned MoE checkpoints often do), packed and padded, with samples on; and each data format
through ``fit`` to the model card. Each run is the CLI, one optimizer step, a validation, the samples, the export, the
card and the report. A new objective or format joins the matrix with one line in ``OBJECTIVES`` or ``FORMATS``."""

import math

import lightning as L
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2MoeConfig

from prefmodule.cli import main
from prefmodule.data.batches import PromptBatch
from prefmodule.paths import resolve

from conftest import TINY_MODEL, read_jsonl, write_jsonl
from test_architectures import DECODER

pytestmark = pytest.mark.samples

# objective -> its class and the settings it trains with here
OBJECTIVES = {
    "dpo": ("prefmodule.DPOModule", []),
    "orpo": ("prefmodule.ORPOModule", []),
    "simpo": ("prefmodule.SimPOModule", []),
    "cpo": ("prefmodule.CPOModule", []),
    "kto": ("prefmodule.KTOModule", []),
    "reward": ("prefmodule.RewardModule", []),
    "online_dpo": ("prefmodule.OnlineDPOModule", ["--model.init_args.reward=prefmodule.sampling.rules:politeness",
                                                  "--model.init_args.max_new_tokens=4"]),
    "grpo": ("prefmodule.GRPOModule", ["--model.init_args.reward=prefmodule.sampling.rules:politeness",
                                       "--model.init_args.max_new_tokens=4", "--model.init_args.num_generations=2",
                                       "--model.init_args.beta=0.1"]),
    "rloo": ("prefmodule.RLOOModule", ["--model.init_args.reward=prefmodule.sampling.rules:politeness",
                                       "--model.init_args.max_new_tokens=4"]),
}
LAYOUTS = {"packed": "--data.padding_free=true", "padded": "--data.padding_free=false"}
ONE_STEP = ["--trainer.max_steps=1", "--trainer.val_check_interval=1", "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false", "--trainer.log_every_n_steps=1", "--data.batch_size=4",
            "--samples.num_prompts=2", "--samples.max_new_tokens=4"]


class Layouts(L.Callback):
    """Whether each training batch came packed (one row, ``sequence_ids``) or padded."""

    def __init__(self):
        self.packed = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if isinstance(batch, PromptBatch):  # prompts, whose sampled pairs the module lays out with the data's collator
            self.packed.append(module.collator().padding_free)
        else:
            self.packed.append(batch.sequences.packed)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """``dense``: the shipped tiny Llama; ``moe``: a tiny Qwen2-MoE whose config says ``output_router_logits: true``."""
    folder = tmp_path_factory.mktemp("moe")
    config = Qwen2MoeConfig(**DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                            shared_expert_intermediate_size=32, router_aux_loss_coef=0.02, output_router_logits=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(resolve(TINY_MODEL)).save_pretrained(folder)
    return {"dense": TINY_MODEL, "moe": str(folder)}


@pytest.fixture(scope="module")
def data(tmp_path_factory, demo_rows):
    folder = tmp_path_factory.mktemp("data")
    val = read_jsonl(resolve("asset://demo/val.jsonl"))[:2]
    return (f"--data.train={write_jsonl(folder / 'train.jsonl', demo_rows[:4])}",
            f"--data.val={write_jsonl(folder / 'val.jsonl', val)}", f"--data.cache_dir={folder / 'cache'}")


def run(objective: str, root, *args: str):
    """``fit`` through the CLI; returns the trainer, its run folder and the layouts of its training batches."""
    class_path, settings = OBJECTIVES[objective]
    cli = main(["fit", f"--model={class_path}", f"--trainer.default_root_dir={root}", *ONE_STEP, *settings, *args,
                "--trainer.callbacks+=test_combinations.Layouts"])
    trainer = cli.trainer
    layouts = next(c for c in trainer.callbacks if isinstance(c, Layouts))
    return trainer, trainer.log_dir, layouts.packed


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("model", ["dense", "moe"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objective_model_layout_with_samples(objective, model, layout, models, data, tmp_path):
    trainer, log_dir, packed = run(objective, tmp_path, f"--model.model={models[model]}", LAYOUTS[layout], *data)
    metrics = trainer.callback_metrics
    assert trainer.global_step == 1 and math.isfinite(metrics["train/loss"]) and math.isfinite(metrics["val/loss"])
    assert ("val/accuracy" in metrics) is (objective == "reward")  # a reward model's own metrics, TRL's names
    assert ("val/reward" in metrics) is (objective in ("grpo", "rloo"))  # the held-out reward of sampled completions
    assert packed == [layout == "packed"]
    if model == "moe":  # every objective adds and logs the router loss, in training and validation
        assert metrics["train/aux_loss"] > 1.0 and metrics["val/aux_loss"] > 1.0
    else:
        assert "train/aux_loss" not in metrics
    if trainer.lightning_module.writes_text:  # every objective that generates (a reward model does not)
        samples = read_jsonl(f"{log_dir}/samples.jsonl")
        assert [row["step"] for row in samples] == [0, 0, 1, 1]  # before the first step and at the validation
        assert all(row["prompt"] and row["completion"] is not None for row in samples)
    card = open(f"{log_dir}/hf_model/README.md").read()
    assert f"`{OBJECTIVES[objective][0].split('.')[-1]}`" in card and "train.jsonl" in card


# ----- data formats ------------------------------------------------------------------------------------------------
def chat(row):
    return {"prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}]}


def sharegpt(row):
    return {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "human", "value": row["prompt"]}],
            "chosen": {"from": "gpt", "value": row["chosen"]}, "rejected": {"from": "gpt", "value": row["rejected"]}}


def alpaca(row):
    return {"instruction": row["prompt"], "input": "", "output": [row["chosen"], row["rejected"]]}


def unpaired(row):
    return {"prompt": row["prompt"], "completion": row["chosen"], "label": True}


# format -> (objective, row of a demo pair, the sample line's message is the last user message)
FORMATS = {
    "standard": ("orpo", lambda row: row, False),
    "conversational": ("orpo", chat, True),
    "sharegpt": ("dpo", sharegpt, True),
    "alpaca": ("simpo", alpaca, True),
    "prompts": ("online_dpo", lambda row: {"prompt": row["prompt"]}, False),
    "prompts_answers": ("grpo", lambda row: {"prompt": row["prompt"], "answer": "1"}, False),
    "unpaired": ("kto", lambda row: [unpaired(row), {**unpaired(row), "completion": row["rejected"], "label": False}],
                 False),
}


def rows_of(convert, rows):
    converted = [convert(row) for row in rows]
    return [r for row in converted for r in (row if isinstance(row, list) else [row])]


@pytest.mark.parametrize("name", FORMATS)
def test_each_format_fits_to_the_model_card(name, demo_rows, tmp_path):
    objective, convert, chat_prompt = FORMATS[name]
    train = write_jsonl(tmp_path / f"{name}.jsonl", rows_of(convert, demo_rows[:4]))
    val = write_jsonl(tmp_path / f"{name}_val.jsonl", rows_of(convert, demo_rows[4:6]))
    trainer, log_dir, _ = run(objective, tmp_path, f"--model.model={TINY_MODEL}", f"--data.train={train}",
                              f"--data.val={val}", f"--data.cache_dir={tmp_path / 'cache'}")
    assert trainer.global_step == 1 and math.isfinite(trainer.callback_metrics["val/loss"])
    samples = read_jsonl(f"{log_dir}/samples.jsonl")
    expected = {row["prompt"] for row in demo_rows[4:6]} if chat_prompt else {None}
    assert {row["message"] for row in samples} == expected  # a chat prompt is shown by its last user message
    card = open(f"{log_dir}/hf_model/README.md").read()
    assert f"- train: `{train}`" in card and f"- val: `{val}`" in card


def test_a_weighted_yaml_mixture_fits_and_the_card_lists_each_source(demo_rows, tmp_path):
    first = write_jsonl(tmp_path / "first.jsonl", demo_rows[:4])
    second = write_jsonl(tmp_path / "second.jsonl", rows_of(chat, demo_rows[4:8]))
    config = tmp_path / "mixture.yaml"
    config.write_text(yaml.safe_dump({"data": {"train": [{"path": first, "weight": 0.7},
                                                         {"path": second, "weight": 0.3}]}}))
    val = write_jsonl(tmp_path / "val.jsonl", demo_rows[8:10])
    trainer, log_dir, _ = run("orpo", tmp_path, f"--model.model={TINY_MODEL}", "--config", str(config),
                              f"--data.val={val}", f"--data.cache_dir={tmp_path / 'cache'}")
    assert trainer.global_step == 1
    card = open(f"{log_dir}/hf_model/README.md").read()
    assert f"- train: `{first}` (weight 0.7), `{second}` (weight 0.3)" in card
