"""The Hugging Face export is the base model as it was, trained: its config, generation config and chat
template; LoRA merged on a CPU copy (the training model untouched) or saved alone; LoRA options are peft's."""

import copy
import json
import shutil

import lightning as L
import pytest
import torch
from peft import AutoPeftModelForCausalLM, LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefmodule import ORPOModule, PreferenceDataModule
from prefmodule.errors import ConfigError
from prefmodule.paths import resolve
from prefmodule.models.sharding import cpu_copy

from conftest import TINY_MODEL, write_jsonl
from test_logps import a_batch

TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"


@pytest.fixture
def tiny_with_generation_settings(tmp_path):
    """The shipped tiny Llama with sampling settings in its generation config."""
    folder = tmp_path / "base"
    shutil.copytree(resolve(TINY_MODEL), folder)
    settings = json.loads((folder / "generation_config.json").read_text())
    (folder / "generation_config.json").write_text(json.dumps({**settings, "do_sample": True, "temperature": 0.6,
                                                               "top_p": 0.9}))
    return str(folder)


def test_fit_exports_the_chat_template_generation_config_and_use_cache(tiny_with_generation_settings, tmp_path,
                                                                       demo_rows):
    module = ORPOModule(model=tiny_with_generation_settings, lr=1e-2, lora={"r": 4, "lora_alpha": 8})
    data = PreferenceDataModule(train=write_jsonl(tmp_path / "train.jsonl", demo_rows[:4]), batch_size=4,
                                chat_template=TEMPLATE, cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, datamodule=module.connect(data))
    exported = tmp_path / "hf_model"
    assert AutoTokenizer.from_pretrained(exported).chat_template == TEMPLATE
    assert AutoTokenizer.from_pretrained(tiny_with_generation_settings).chat_template != TEMPLATE
    generation = json.loads((exported / "generation_config.json").read_text())
    assert (generation["do_sample"], generation["temperature"], generation["top_p"]) == (True, 0.6, 0.9)
    assert json.loads((exported / "config.json").read_text())["use_cache"] is True
    assert module.policy.config.use_cache is True  # training passes use_cache=False per call instead


def test_lora_export_merges_on_a_copy_sharing_the_base_weights_and_leaves_the_policy_as_it_was(tmp_path, demo_rows):
    module = ORPOModule(model=TINY_MODEL, lora={"r": 4, "lora_alpha": 8, "use_dora": True, "use_rslora": True})
    module.configure_model()
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)  # as if trained
    before = {name: p.clone() for name, p in module.policy.state_dict().items()}
    expected = copy.deepcopy(module.policy).merge_and_unload(safe_merge=True)  # peft's own merge

    copied = cpu_copy(module.policy)  # what the export merges into: on the CPU, the policy's own tensors
    ours = dict(module.policy.named_parameters())
    assert all(p.data_ptr() == ours[name].data_ptr() for name, p in copied.named_parameters())
    module.export_hf(str(tmp_path / "merged"))
    after = module.policy.state_dict()
    assert after.keys() == before.keys()
    for name, value in before.items():
        torch.testing.assert_close(after[name], value, rtol=0, atol=0, msg=name)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert not [n for n, _ in merged.named_parameters() if "lora" in n]
    for (name, value), reference in zip(merged.state_dict().items(), expected.state_dict().values()):
        torch.testing.assert_close(value, reference, rtol=1e-6, atol=1e-7, msg=name)
    batch = a_batch(module, demo_rows[:4])
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model_stats(merged, batch.sequences).logps,
                                   module.model_stats(module.policy, batch.sequences).logps, rtol=1e-5, atol=1e-5)


def test_adapter_alone_is_saved_without_merging(tmp_path, demo_rows):
    module = ORPOModule(model=TINY_MODEL, lora={"r": 4, "lora_alpha": 8})
    module.configure_model()
    with torch.no_grad():
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    module.export_hf(str(tmp_path / "adapter"), merge_adapters=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "adapter" / "model.safetensors").exists()
    reloaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "adapter").eval()
    batch = a_batch(module, demo_rows[:4])
    module.policy.eval()
    with torch.no_grad():
        torch.testing.assert_close(module.model_stats(reloaded, batch.sequences).logps,
                                   module.model_stats(module.policy, batch.sequences).logps, rtol=1e-5, atol=1e-5)


def test_lora_settings_are_peft_lora_config_arguments():
    module = ORPOModule(model=TINY_MODEL, lora={"r": 8, "lora_alpha": 16, "use_dora": True, "use_rslora": True,
                                               "modules_to_save": ["lm_head"]})
    assert isinstance(module.lora, LoraConfig)
    assert (module.lora.use_dora, module.lora.use_rslora, module.lora.modules_to_save) == (True, True, ["lm_head"])
    assert module.lora.target_modules == "all-linear" and module.lora.task_type == "CAUSAL_LM"
    with pytest.raises(ConfigError, match=r"\['alpha', 'dropout'\] are not peft.LoraConfig arguments"):
        ORPOModule(model=TINY_MODEL, lora={"r": 4, "alpha": 8, "dropout": 0.1})  # the names before peft's
    with pytest.raises(ConfigError, match=r"\['rank'\] are not peft.LoraConfig arguments"):
        ORPOModule(model=TINY_MODEL, lora={"rank": 4})
