"""Every module setting is checked before any weights load: one message naming the option, the value and
what is allowed; through the CLI, exit code 2 and no traceback."""

from pathlib import Path

import pytest
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from prefmodule import DPOModule, ORPOModule
from prefmodule.training.checkpoints import RunCheckpoint
from prefmodule.cli import main
from prefmodule.errors import ConfigError, MissingFileError
from prefmodule.training.guard import NonFiniteGuard
from prefmodule.paths import resolve

from conftest import TINY_MODEL

CONFIGS = Path(__file__).parent.parent / "configs"


def cli_error(capsys, tmp_path, *args) -> str:
    """The one error line the CLI prints for ``fit`` with ``args``; it exits with code 2, no traceback."""
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), f"--trainer.default_root_dir={tmp_path}", *args])
    err = capsys.readouterr().err
    (line,) = [line for line in err.splitlines() if line.startswith("prefmodule: error: ")]
    assert exit_.value.code == 2 and "Traceback" not in err
    return line.removeprefix("prefmodule: error: ")


@pytest.fixture
def bert(tmp_path):
    config = BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    BertForMaskedLM(config).save_pretrained(tmp_path / "bert")
    return str(tmp_path / "bert")


@pytest.fixture
def tokenizer_without_eos(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(resolve(TINY_MODEL))
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "no_eos")
    return str(tmp_path / "no_eos")


@pytest.mark.parametrize("args, message", [
    (["--model.model=./no/such/folder"], "model.model='./no/such/folder': no such folder ("),
    (["--model.beta=-1"], "model.beta=-1.0: must be > 0 (the objective's temperature or weight; DPO typically 0.1)."),
    (["--model.loss_type=sigmod"], "Unknown DPO loss_type ['sigmod']; valid names are ['aot', "),
    (["--model.reference=adapter"], "model.reference='adapter' with lora=None, ref_model=None: the adapter reference "
                                    "is the policy with its LoRA adapters disabled, so it needs `lora`"),
    (["--model.warmup=2.5"], "model.warmup=2.5: must be a fraction of all steps in [0, 1) or a whole number of steps."),
], ids=["missing model", "beta", "loss type", "adapter without lora", "warmup"])
def test_bad_settings_from_the_cli(args, message, capsys, tmp_path):
    assert cli_error(capsys, tmp_path, *args).startswith(message)


def test_a_non_causal_model_is_refused_from_its_config(bert, capsys, tmp_path):
    assert cli_error(capsys, tmp_path, f"--model.model={bert}") == (
        f"model.model={bert!r} is a BertForMaskedLM model, not a causal language model: preference training needs a "
        "decoder that predicts the next token (e.g. Llama, Qwen, Mistral, GPT-2).")


def test_a_tokenizer_without_eos_is_refused(tokenizer_without_eos, capsys, tmp_path):
    assert cli_error(capsys, tmp_path, f"--model.tokenizer={tokenizer_without_eos}").startswith(
        f"the tokenizer of {tokenizer_without_eos!r} has no EOS token")


@pytest.mark.parametrize("settings, message", [
    (dict(lr=0.0), "model.lr=0.0: must be > 0"),
    (dict(lr=float("nan")), "model.lr=nan: must be > 0"),
    (dict(weight_decay=-0.1), "model.weight_decay=-0.1: must be >= 0"),
    (dict(warmup=-1), "model.warmup=-1: must be a fraction"),
    (dict(logps_chunk_size=-1), "model.logps_chunk_size=-1: must be a whole number >= 0"),
    (dict(dtype="float8"), "model.dtype='float8': must be one of ['float32', 'bfloat16', 'float16']"),
    (dict(attn_implementation="fast"), "model.attn_implementation='fast': must be one of ['eager', "),
    (dict(lora={"r": 0}), "model.lora.r=0: must be a whole number >= 1"),
    (dict(lora={"r": 4, "lora_dropout": 1.0}), "model.lora.lora_dropout=1.0: must be in [0, 1)"),
    (dict(lora={"rank": 4}), "model.lora: ['rank'] are not peft.LoraConfig arguments"),
    (dict(model=""), "model.model='': must be a model folder"),
])
def test_module_settings(settings, message):
    with pytest.raises(ConfigError) as error:
        ORPOModule(**{"model": TINY_MODEL, **settings})
    assert str(error.value).startswith(message)


def test_missing_paths_are_missing_file_errors(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(MissingFileError, match="a file, not a folder"):
        ORPOModule(model=str(tmp_path / "weights.bin"))
    with pytest.raises(MissingFileError, match="no such folder"):
        DPOModule(model=TINY_MODEL, tokenizer=str(tmp_path / "tok"))
    with pytest.raises(MissingFileError, match="no such shipped asset"):
        ORPOModule(model="asset://tiny-lama")
    with pytest.raises(MissingFileError, match="HF_HUB_OFFLINE is set"):
        ORPOModule(model="no-such-org/no-such-model")


@pytest.mark.parametrize("make, message", [
    (lambda: RunCheckpoint(every_minutes=0), "every_minutes=0: must be > 0"),
    (lambda: RunCheckpoint(every_steps=0), "every_steps=0: must be a whole number >= 1"),
    (lambda: RunCheckpoint(keep=0), "keep=0: must be a whole number >= 1"),
    (lambda: NonFiniteGuard(max_in_a_row=0), "max_in_a_row=0: must be a whole number >= 1"),
])
def test_checkpoint_and_guard_settings(make, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
        make()
