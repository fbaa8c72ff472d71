"""The architectures people align, each a tiny random model built from transformers' own config class:
packed == padded and chunked head == full logits (values and gradients), DPO and ORPO train, and the
Hugging Face export reloads with the same log-probs and the same tie."""

import lightning as L
import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM, AutoTokenizer, Gemma2Config, GPT2Config, LlamaConfig, MistralConfig, Phi3Config,
    Qwen2Config, Qwen2MoeConfig,
)

from prefmodule import DPOModule, ORPOModule, PreferenceDataModule
from prefmodule.models.attention import VARLEN_SDPA
from prefmodule.models.logps import LogitsTransform
from prefmodule.paths import resolve

from conftest import TINY_MODEL, write_jsonl
from test_logps import a_batch, packed, relative_error, stats_and_grads

SPECIAL = dict(vocab_size=1024, bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.2)
DECODER = dict(SPECIAL, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512)
ARCHITECTURES = {
    "llama": lambda: LlamaConfig(**DECODER),
    "qwen2-tied": lambda: Qwen2Config(**DECODER, tie_word_embeddings=True),
    "mistral-sliding-window": lambda: MistralConfig(**DECODER, sliding_window=8),  # the pairs run 20-60 tokens
    "gemma2-softcap-tied": lambda: Gemma2Config(**DECODER, head_dim=8, query_pre_attn_scalar=8, sliding_window=8,
                                                final_logit_softcapping=2.0, tie_word_embeddings=True),
    "phi3": lambda: Phi3Config(**DECODER),
    "gpt2": lambda: GPT2Config(**SPECIAL, n_embd=32, n_layer=2, n_head=4, n_positions=512),  # Conv1D, learned positions
    "qwen2-moe": lambda: Qwen2MoeConfig(**DECODER, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                        shared_expert_intermediate_size=32, router_aux_loss_coef=0.02),
}
TIED = {"qwen2-tied", "gemma2-softcap-tied", "gpt2"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Architecture name -> a folder holding its random model (fixed seed) and the shipped tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(TINY_MODEL))
    folders = {}

    def folder(name):
        if name not in folders:
            folders[name] = tmp_path_factory.mktemp(name)
            torch.manual_seed(0)
            AutoModelForCausalLM.from_config(ARCHITECTURES[name]()).save_pretrained(folders[name])
            tokenizer.save_pretrained(folders[name])
        return str(folders[name])

    return folder


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_packed_padded_chunked_and_full_logits_agree(name, saved, demo_rows):
    full, chunked = (ORPOModule(model=saved(name), logps_chunk_size=size) for size in (0, 5))
    for module in (full, chunked):
        module.configure_model()
        module.policy.eval()  # GPT-2's dropout off
    assert chunked.chunked_logps and not full.chunked_logps  # no architecture falls back to full logits
    assert chunked.head_transform == LogitsTransform(softcap=2.0 if name.startswith("gemma2") else None)
    # Gemma 2 soft-caps its attention scores, which SDPA cannot: eager attention, packed rows with a block mask.
    assert (chunked.policy.config._attn_implementation == VARLEN_SDPA) is (not name.startswith("gemma2"))
    padded = a_batch(full, demo_rows[:4])
    expected, expected_grads = stats_and_grads(full, padded)
    assert (expected.logps < -1).all() and expected.lengths.min() > 0
    for module, batch in ((full, packed(padded)), (chunked, padded), (chunked, packed(padded))):
        actual, actual_grads = stats_and_grads(module, batch)
        torch.testing.assert_close(actual.logps, expected.logps, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-5)
        for parameter, grad in expected_grads.items():
            assert relative_error(actual_grads[parameter], grad) < 1e-4, parameter
        if name.endswith("moe"):  # the router loss, padding masked out, equals transformers' own
            with torch.no_grad():
                torch.testing.assert_close(module.policy_forward(batch.sequences)[1],
                                           full.policy_forward(padded.sequences)[1], rtol=1e-5, atol=0)
    if name.endswith("moe"):
        with torch.no_grad():
            own = full.policy(input_ids=padded.sequences.input_ids, attention_mask=padded.sequences.attention_mask,
                              output_router_logits=True).aux_loss
            torch.testing.assert_close(full.policy_forward(padded.sequences)[1], own, rtol=1e-6, atol=0)
        assert own > 1.0  # num_experts * sum(fraction routed x mean probability): 1 when perfectly balanced


def fit(module, data, root, **trainer_args):
    trainer = L.Trainer(default_root_dir=root, max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                        log_every_n_steps=1, limit_val_batches=0, accelerator="cpu", **trainer_args)
    trainer.fit(module, datamodule=module.connect(data))
    return trainer


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_dpo_and_orpo_train_and_the_export_reloads_the_same(name, saved, demo_rows, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", demo_rows[:8])
    data = lambda: PreferenceDataModule(train=train, batch_size=4, cache_dir=str(tmp_path / "cache"))  # noqa: E731
    orpo = ORPOModule(model=saved(name), lr=1e-2)
    orpo_trainer = fit(orpo, data(), tmp_path / "orpo", logger=False, enable_checkpointing=False)
    assert orpo_trainer.global_step == 2 and torch.isfinite(orpo_trainer.callback_metrics["train/loss"])

    dpo = DPOModule(model=saved(name), lr=1e-2)
    trainer = fit(dpo, data(), tmp_path / "dpo")
    metrics = trainer.callback_metrics
    assert trainer.global_step == 2 and metrics["train/rewards/margins"] != 0  # the policy moved off its reference
    if name.endswith("moe"):
        assert metrics["train/aux_loss"] > 1.0
    else:
        assert "train/aux_loss" not in metrics

    exported = f"{trainer.log_dir}/hf_model"
    reloaded = AutoModelForCausalLM.from_pretrained(exported).eval()
    batch = a_batch(dpo, demo_rows[8:12])
    dpo.policy.eval()
    with torch.no_grad():
        ours = dpo.model_stats(dpo.policy, batch.sequences)
        theirs = dpo.model_stats(reloaded, batch.sequences)
    torch.testing.assert_close(theirs.logps, ours.logps, rtol=1e-5, atol=1e-5)
    tied = name in TIED
    policy, copy = dpo.policy, reloaded
    for model in (policy, copy):
        assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) is tied
    with safe_open(f"{exported}/model.safetensors", "pt") as handle:
        head_saved = any(key.startswith("lm_head") for key in handle.keys())
    assert head_saved is not tied
    assert reloaded.config.use_cache is True  # as the base model had it


def test_router_loss_weight_comes_from_the_config_unless_the_module_sets_it(saved, demo_rows):
    moe = AutoModelForCausalLM.from_pretrained(saved("qwen2-moe"))
    dense = AutoModelForCausalLM.from_pretrained(saved("llama"))
    weights = {coef: ORPOModule(model=saved("qwen2-moe"), router_aux_loss_coef=coef).router_loss_weight(moe)
               for coef in (None, 0.5, 0.0)}
    assert weights == {None: 0.02, 0.5: 0.5, 0.0: 0.0}
    assert ORPOModule(model=saved("llama"), router_aux_loss_coef=0.5).router_loss_weight(dense) == 0.0
    module = ORPOModule(model=saved("qwen2-moe"), router_aux_loss_coef=0.5)
    module.configure_model()
    batch = a_batch(module, demo_rows[:2])
    with torch.no_grad():
        plain, aux_loss = module.batch_outputs(batch)
        total = module.training_step(batch, 0)  # the objective's loss plus the weighted router loss
    assert aux_loss > 1.0 and "aux_loss" not in plain.extra
    torch.testing.assert_close(total, plain.loss + 0.5 * aux_loss)
    # a plain forward asks for no router loss
    assert module.model_stats(module.policy, batch.sequences).logps.shape == (4,)
