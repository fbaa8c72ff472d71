"""The modules used from Python with a plain Lightning Trainer."""


import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM

from prefmodule import DPOModule, ORPOModule, PreferenceDataModule, SimPOModule
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.tokenize import tokenize_pair
from prefmodule.errors import ConfigError
from prefmodule.models.logps import stats_from_logits

from conftest import TINY_MODEL


def trainer(tmp_path, **kwargs):
    defaults = dict(default_root_dir=tmp_path, max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                    val_check_interval=2, log_every_n_steps=1)
    return L.Trainer(**{**defaults, **kwargs})


def a_batch(module, rows):
    pairs = [{"index": i, **tokenize_pair(module.tokenizer, r["prompt"], r["chosen"], r["rejected"])}
             for i, r in enumerate(rows)]
    return PreferenceCollator(module.tokenizer.pad_token_id)(pairs)


@pytest.mark.parametrize("module_class", [DPOModule, ORPOModule, SimPOModule])
def test_plain_trainer_fit(module_class, tmp_path, small_data):
    train, val = small_data
    module = module_class(model=TINY_MODEL, lr=1e-3)
    data = PreferenceDataModule(train=train, val=val, batch_size=4)
    trainer(tmp_path).fit(module, datamodule=module.connect(data))
    assert data.get_tokenizer() is module.tokenizer  # the datamodule was given the model's tokenizer (connect)
    assert (tmp_path / "lightning_logs" / "version_0" / "hf_model" / "config.json").is_file()
    results = trainer(tmp_path).validate(module, datamodule=module.connect(data))[0]
    scored = [row for batch in trainer(tmp_path).predict(module, datamodule=module.connect(data)) for row in batch]
    assert len(scored) == 16 and results["val/rewards/accuracies"] == pytest.approx(
        sum(row["preferred"] == "chosen" for row in scored) / 16, abs=1e-6)
    assert results["val/loss"] > 0 and results["val/logps/chosen"] < 0


def test_dpo_reference_is_frozen_outside_optimizer_and_checkpoint(tmp_path, small_data):
    train, val = small_data
    module = DPOModule(model=TINY_MODEL, lr=1e-2)
    fit = trainer(tmp_path, max_steps=3)
    fit.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, val=val, batch_size=4)))
    start = AutoModelForCausalLM.from_pretrained(module.tokenizer.name_or_path)
    for (name, ref_param), start_param in zip(module.ref_model.named_parameters(), start.parameters()):
        assert not ref_param.requires_grad, name
        torch.testing.assert_close(ref_param, start_param, rtol=0, atol=0)
    assert not module.ref_model.training and module.policy.training
    optimised = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in module.ref_model.parameters()}
    assert optimised == {id(p) for p in module.policy.parameters()}
    moved = sum((p - s).abs().sum().item() for p, s in zip(module.policy.parameters(), start.parameters()))
    assert moved > 0  # the policy trained while the reference stayed put
    checkpoint = torch.load(fit.checkpoint_callback.best_model_path, weights_only=False)
    assert not [k for k in checkpoint["state_dict"] if k.startswith("ref_model.")]
    assert [k for k in checkpoint["state_dict"] if k.startswith("policy.")]


def test_checkpoint_resume_continues_step_and_optimizer(tmp_path, small_data):
    train, val = small_data
    data = PreferenceDataModule(train=train, val=val, batch_size=4)
    first = trainer(tmp_path, max_steps=2)
    module = ORPOModule(model=TINY_MODEL, lr=1e-3)
    first.fit(module, datamodule=module.connect(data))
    ckpt = first.checkpoint_callback.best_model_path
    resumed_module = ORPOModule(model=TINY_MODEL, lr=1e-3)
    resumed = trainer(tmp_path, max_steps=4)
    resumed.fit(resumed_module, datamodule=resumed_module.connect(PreferenceDataModule(train=train, val=val, batch_size=4)), ckpt_path=ckpt)
    assert resumed.global_step == 4
    saved = torch.load(ckpt, weights_only=False)
    assert saved["optimizer_states"][0]["state"]  # Adam moments were saved and restored
    assert saved["lr_schedulers"][0]["last_epoch"] == 2


class BatchLog(L.Callback):
    def __init__(self):
        self.indices = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.indices.append(batch.index.tolist())


def test_mid_epoch_resume_trains_the_rest_of_the_epoch_as_if_never_stopped(tmp_path, small_data):
    train, val = small_data  # 32 pairs in batches of 4: 8 a epoch; stop after 3, resume to 11 (into epoch 2)
    data = lambda: PreferenceDataModule(train=train, val=val, batch_size=4)  # noqa: E731
    straight_log, first_log, resumed_log = BatchLog(), BatchLog(), BatchLog()
    straight = ORPOModule(model=TINY_MODEL, lr=1e-3)
    trainer(tmp_path / "a", max_steps=11, val_check_interval=3, callbacks=[straight_log]).fit(
        straight, datamodule=straight.connect(data()))
    class StopAt3(L.Callback):  # an interruption: the run is planned for 11 steps (its LR schedule too)
        def on_train_batch_end(self, trainer, *args):
            trainer.should_stop = trainer.global_step == 3

    first = trainer(tmp_path / "b", max_steps=11, val_check_interval=3, callbacks=[first_log, StopAt3()])
    interrupted = ORPOModule(model=TINY_MODEL, lr=1e-3)
    first.fit(interrupted, datamodule=interrupted.connect(data()))
    ckpt = first.checkpoint_callback.best_model_path
    assert "step=3" in ckpt and torch.load(ckpt, weights_only=False)["loops"]["fit_loop"]["state_dict"][
        "combined_loader"] == [{"epoch": 0, "batches": 3}]
    resumed = ORPOModule(model=TINY_MODEL, lr=1e-3)
    trainer(tmp_path / "b", max_steps=11, val_check_interval=3, callbacks=[resumed_log]).fit(
        resumed, datamodule=resumed.connect(data()), ckpt_path=ckpt)
    assert first_log.indices + resumed_log.indices == straight_log.indices
    assert len({i for batch in straight_log.indices[:8] for i in batch}) == 32  # epoch 1: every pair once
    for name, weight in straight.policy.named_parameters():
        torch.testing.assert_close(dict(resumed.policy.named_parameters())[name], weight, rtol=1e-5, atol=1e-6)


def test_hf_export_loads_and_gives_same_logps(tmp_path, demo_rows):
    module = ORPOModule(model=TINY_MODEL)
    module.configure_model()
    with torch.no_grad():
        for p in module.policy.parameters():
            p.add_(0.01 * torch.randn_like(p))  # make it differ from the shipped weights
    module.export_hf(str(tmp_path / "hf"))
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    batch = a_batch(module, demo_rows[:6])
    module.policy.eval()
    with torch.no_grad():
        ours = module.model_stats(module.policy, batch.sequences)
        sequences = batch.sequences
        logits = reloaded(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits
        theirs = stats_from_logits(logits, sequences.labels)
    torch.testing.assert_close(ours.logps, theirs.logps, rtol=1e-6, atol=1e-6)
    assert (ours.logps < 0).all()


def test_lora_trains_only_adapters_and_export_merges(tmp_path, small_data):
    train, val = small_data
    module = ORPOModule(model=TINY_MODEL, lr=1e-2, lora={"r": 4, "lora_alpha": 8})
    trainer(tmp_path).fit(module, datamodule=module.connect(PreferenceDataModule(train=train, val=val, batch_size=4)))
    trainable = [n for n, p in module.policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "lightning_logs" / "version_0" / "hf_model")
    assert not [n for n, _ in exported.named_parameters() if "lora" in n]


def test_dpo_logps_are_sums_and_orpo_averages(demo_rows):
    dpo, orpo = DPOModule(model=TINY_MODEL), ORPOModule(model=TINY_MODEL)
    for m in (dpo, orpo):
        m.configure_model()
    batch = a_batch(dpo, demo_rows[:4])
    with torch.no_grad():
        out_dpo, out_orpo = dpo.batch_outputs(batch)[0], orpo.batch_outputs(batch)[0]
    torch.testing.assert_close(out_dpo.chosen.logps, out_orpo.chosen.logps)
    # A fresh DPO policy equals its reference: every implicit reward is exactly zero.
    assert torch.equal(out_dpo.chosen_rewards, torch.zeros(4))
    torch.testing.assert_close(out_orpo.chosen_rewards, 0.1 * out_orpo.chosen.logps / out_orpo.chosen.lengths)


def test_unknown_loss_type_fails_at_construction():
    with pytest.raises(ValueError, match="sigmoid"):
        DPOModule(model=TINY_MODEL, loss_type="sigmod")


def test_missing_model_path_says_what_to_do(tmp_path):
    with pytest.raises(OSError, match="HF_HUB_OFFLINE is set"):
        ORPOModule(model="no-such-org/no-such-model")


def test_dpo_state_leaves_out_the_reference_but_loads_the_policy_strictly():
    module = DPOModule(model=TINY_MODEL)
    module.configure_model()
    state = module.state_dict()
    assert not [k for k in state if k.startswith("ref_model.")] and [k for k in state if k.startswith("policy.")]
    module.load_state_dict(state)  # the reference keeps its weights without keys of its own
    del state[next(k for k in state if k.startswith("policy."))]
    with pytest.raises(RuntimeError, match="Missing key"):
        module.load_state_dict(state)


def test_mlp_checkpointing_gives_the_same_log_probs_and_gradients(demo_rows, tmp_path, capsys):
    """``gradient_checkpointing: mlp`` recomputes each decoder block's MLP in backward: the values and gradients
    of keeping its activations, padded and packed; other values are refused in one line."""
    from torch.utils.checkpoint import checkpoint

    from test_logps import a_batch, packed, stats_and_grads

    kept, recomputed = (ORPOModule(model=TINY_MODEL, gradient_checkpointing=flag) for flag in (False, "mlp"))
    for module in (kept, recomputed):
        module.configure_model()
    mlps = [layer.mlp for layer in recomputed.policy.model.layers]
    assert len(mlps) == 2 and all(mlp.forward.func is checkpoint for mlp in mlps)
    assert not recomputed.policy.is_gradient_checkpointing  # the blocks themselves keep their activations
    padded = a_batch(kept, demo_rows[:4])
    for batch in (padded, packed(padded)):
        expected, expected_grads = stats_and_grads(kept, batch)
        actual, actual_grads = stats_and_grads(recomputed, batch)
        torch.testing.assert_close(actual.logps, expected.logps, rtol=0, atol=0)
        for name, grad in expected_grads.items():
            torch.testing.assert_close(actual_grads[name], grad, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ConfigError, match=r"model.gradient_checkpointing='attention': must be true \(whole decoder "
                                          r"blocks\), mlp \(their MLPs alone\) or false"):
        ORPOModule(model=TINY_MODEL, gradient_checkpointing="attention")
