"""Packed rows attend per sequence: the same values as separate rows, no tokens x tokens mask."""

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from test_architectures import ARCHITECTURES
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, Qwen2Config
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from prefmodule import ORPOModule, PreferenceDataModule
from prefmodule.cli import main
from prefmodule.models.attention import VARLEN_SDPA, enable_packed_attention, packed_inputs, packed_probe_problem
from prefmodule.paths import resolve

TINY_MODEL = "asset://tiny-llama"


def packed_row(rows):
    position_ids = torch.cat([torch.arange(len(r)) for r in rows])[None]
    sequence_ids = torch.cat([torch.full((len(r),), k) for k, r in enumerate(rows)])[None]
    return torch.cat(rows)[None], position_ids, sequence_ids


def logits_packed_and_apart(model, rows):
    input_ids, position_ids, sequence_ids = packed_row(rows)
    together = model(input_ids=input_ids, use_cache=False, **packed_inputs(model, position_ids, sequence_ids)).logits[0]
    apart = torch.cat([model(input_ids=r[None], use_cache=False).logits[0] for r in rows])
    return together, apart


def test_llama_packed_logits_and_gradients_equal_separate_rows():
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL))  # 4 query heads over 2 kv heads
    assert enable_packed_attention(model) and model.config._attn_implementation == VARLEN_SDPA
    rows = [torch.randint(3, 1000, (n,), generator=torch.Generator().manual_seed(n)) for n in (7, 30, 1, 12)]
    together, apart = logits_packed_and_apart(model, rows)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    grads = []
    for logits in (together, apart):
        model.zero_grad()
        logits.logsumexp(-1).sum().backward(retain_graph=True)
        grads.append([p.grad.clone() for p in model.parameters()])
    for packed, separate in zip(*grads):
        torch.testing.assert_close(packed, separate, rtol=1e-4, atol=1e-6)


def test_sliding_window_longer_than_the_window_matches_separate_rows():
    config = Qwen2Config(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         max_window_layers=0, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert enable_packed_attention(model)
    rows = [torch.arange(3, 3 + n) for n in (9, 3, 6)]  # two rows longer than the window of 4
    together, apart = logits_packed_and_apart(model, rows)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)
    plain = AutoModelForCausalLM.from_config(config).eval()
    plain.load_state_dict(model.state_dict())
    full_row = plain(input_ids=rows[0][None], use_cache=False).logits[0]  # sdpa's own sliding-window mask
    torch.testing.assert_close(apart[:9], full_row, rtol=1e-5, atol=1e-5)


def test_packed_attention_builds_no_mask(monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL))
    enable_packed_attention(model)
    masks, sdpa = [], F.scaled_dot_product_attention

    def recording_sdpa(query, key, value, attn_mask=None, **kwargs):
        masks.append(attn_mask)
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording_sdpa)
    input_ids, position_ids, sequence_ids = packed_row([torch.arange(3, 10), torch.arange(3, 20)])
    model(input_ids=input_ids, use_cache=False, **packed_inputs(model, position_ids, sequence_ids))
    assert len(masks) == 2 * model.config.num_hidden_layers and all(m is None for m in masks)


def test_model_that_drops_the_bounds_keeps_sdpa_and_the_block_mask(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    def bounds_lost(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
        for name in ("cu_seq_lens_k", "max_length_q", "max_length_k"):
            kwargs.pop(name, None)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, VARLEN_SDPA, bounds_lost)
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL))
    packing = enable_packed_attention(model)
    assert not packing and packing.reason.startswith("LlamaForCausalLM: a packed probe's outputs differ from separate "
                                                     "rows' by ")
    assert model.config._attn_implementation == "sdpa"
    rows = [torch.arange(3, 10), torch.arange(3, 20)]
    assert packed_inputs(model, *packed_row(rows)[1:])["attention_mask"] is None  # HF builds the block mask
    together, apart = logits_packed_and_apart(model, rows)
    torch.testing.assert_close(together, apart, rtol=1e-5, atol=1e-5)  # right, only slower


@pytest.mark.parametrize(("attention", "padding_free", "packed"), [
    ("sdpa", None, True), ("eager", None, False), ("sdpa", False, False),
])
def test_fit_packs_by_default_when_the_model_allows(attention, padding_free, packed, tmp_path, caplog):
    seen = []

    class BatchKinds(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append(batch.sequences.packed)

    module = ORPOModule(model=TINY_MODEL, attn_implementation=attention)
    data = PreferenceDataModule(train="asset://demo/train.jsonl", padding_free=padding_free, batch_size=4,
                                cache_dir=str(tmp_path / "cache"))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[BatchKinds()], default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        trainer.fit(module, datamodule=module.connect(data))
    assert module.packed_attention is (attention == "sdpa")
    assert seen == [packed, packed]
    said = [record.getMessage() for record in caplog.records if "batches padded, not packed" in record.getMessage()]
    if attention == "eager":  # the fallback is said once, with its reason and its cost on this data
        assert said == ["prefmodule data: batches padded, not packed: its attention (eager) takes no sequence bounds; "
                        "sdpa and flash_attention_2 do (model.attn_implementation); padding takes at least 10% of the "
                        "tokens of train's batches of 4 (in data order), time and memory that packing would save"]
    else:
        assert said == []


def test_padding_free_that_the_model_cannot_take_is_a_settings_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--model=prefmodule.ORPOModule", f"--model.model={TINY_MODEL}", "--model.attn_implementation=eager",
              "--data.train=asset://demo/train.jsonl", "--data.padding_free=true", "--trainer.max_steps=1",
              f"--trainer.default_root_dir={tmp_path}", f"--data.cache_dir={tmp_path / 'cache'}"])
    assert exit.value.code == 2
    err = capsys.readouterr().err  # after the data's lines (read before the models load), before any step
    assert "Traceback" not in err and not list(tmp_path.rglob("*.ckpt"))
    said = [line for line in err.splitlines() if line.startswith("prefmodule: error")]
    assert said == [
        "prefmodule: error: data.padding_free=true: ORPOModule cannot attend to packed rows per sequence (its "
        "attention (eager) takes no sequence bounds; sdpa and flash_attention_2 do (model.attn_implementation)); "
        "packed rows would need Hugging Face's block-diagonal mask, quadratic in tokens. Leave data.padding_free "
        "unset (padded batches) or use model.attn_implementation: sdpa."]


def test_the_probe_compares_log_probs_relative_to_their_scale(monkeypatch):
    """Hidden states in the hundreds (SmolLM2's reach 55) and attention outputs off by float32 rounding must pack;
    sequences that see each other must not."""
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL))
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e3)  # a large residual stream
    varlen = ALL_ATTENTION_FUNCTIONS[VARLEN_SDPA]

    def rounding_noise(*args, **kwargs):
        output, weights = varlen(*args, **kwargs)
        return output * (1 + 1e-6 * torch.randn_like(output)), weights

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, VARLEN_SDPA, rounding_noise)
    assert packed_probe_problem_of(model) is None
    model.set_attn_implementation("sdpa")
    assert enable_packed_attention(model)


def packed_probe_problem_of(model):
    model.set_attn_implementation(VARLEN_SDPA)
    return packed_probe_problem(model)


@pytest.mark.parametrize("task", ["causal_lm", "reward"])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_every_architecture_packs_as_a_policy_and_as_a_reward_model(name, task):
    """Every architecture of the matrix that runs SDPA takes packed rows, with an LM head and with a score head;
    Gemma 2 (eager attention, for its soft-capped scores) says why not."""
    config = ARCHITECTURES[name]()
    torch.manual_seed(0)
    if task == "reward":
        config.num_labels = 1
        model = AutoModelForSequenceClassification.from_config(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    packing = enable_packed_attention(model)
    if name.startswith("gemma2"):
        assert not packing and packing.reason.startswith("its attention (eager) takes no sequence bounds")
    else:
        assert packing and packing.reason is None and model.config._attn_implementation == VARLEN_SDPA
