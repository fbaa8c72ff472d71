"""DPO's four references: copy, adapter, precomputed (with its on-disk cache) and sync (TR-DPO)."""

import copy

import lightning as L
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl.trainer.callbacks import SyncRefModelCallback

from prefmodule import DPOModule, PreferenceDataModule
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.tokenize import tokenize_pair
from prefmodule.paths import resolve
from prefmodule.reference.modes import load_table, save_table

from conftest import TINY_MODEL, read_jsonl, write_jsonl


def trainer(root, **kwargs):
    defaults = dict(default_root_dir=root, max_steps=2, enable_progress_bar=False, enable_model_summary=False,
                    val_check_interval=2, log_every_n_steps=1, logger=False, enable_checkpointing=False)
    return L.Trainer(**{**defaults, **kwargs})


def a_batch(module, rows):
    pairs = [{"index": i, **tokenize_pair(module.tokenizer, r["prompt"], r["chosen"], r["rejected"])}
             for i, r in enumerate(rows)]
    return PreferenceCollator(module.tokenizer.pad_token_id)(pairs)


class StepLosses(L.Callback):
    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())


@pytest.mark.parametrize("kwargs, message", [
    (dict(reference="frozen"), "one of"),
    (dict(reference="adapter"), "needs `lora`"),
    (dict(reference="adapter", lora={"r": 4}, ref_model=TINY_MODEL), "no `ref_model`"),
    (dict(reference="sync", lora={"r": 4}), "without `lora`"),
    (dict(reference="sync", sync_alpha=0.0), "sync_alpha"),
])
def test_incompatible_reference_settings_fail_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DPOModule(model=TINY_MODEL, **kwargs)


def test_adapter_reference_equals_a_separate_copy_of_the_base(demo_rows):
    lora = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.5}
    adapter = DPOModule(model=TINY_MODEL, lora=lora, reference="adapter")
    separate = DPOModule(model=TINY_MODEL, lora=lora, reference="copy")
    for module in (adapter, separate):
        module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():  # adapters that move the policy away from its base
        for name, param in adapter.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    separate.policy.load_state_dict(adapter.policy.state_dict())
    assert adapter.ref_model is None
    assert sum(p.numel() for p in adapter.parameters()) < sum(p.numel() for p in separate.parameters()) / 1.5

    batch = a_batch(adapter, demo_rows[:6])
    # In train mode, where LoRA dropout is on: the reference pass runs without it and restores the mode.
    torch.testing.assert_close(adapter.reference_logps(batch), separate.reference_logps(batch),
                               rtol=1e-6, atol=0)
    assert adapter.policy.training
    for module in (adapter, separate):
        module.policy.eval()
    with torch.no_grad():
        ours, theirs = adapter.batch_outputs(batch)[0], separate.batch_outputs(batch)[0]
    torch.testing.assert_close(ours.chosen_rewards, theirs.chosen_rewards, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.rejected_rewards, theirs.rejected_rewards, rtol=1e-5, atol=1e-6)
    assert ours.chosen_rewards.abs().min() > 1e-3  # the policy differs from its reference


def test_precomputed_reference_gives_the_live_losses(tmp_path, small_data):
    train, val = small_data
    runs = {}
    for reference in ("copy", "precomputed"):
        L.seed_everything(0)
        module = DPOModule(model=TINY_MODEL, reference=reference, lr=1e-2, ref_cache_dir=str(tmp_path / "cache"))
        losses = StepLosses()
        fit = trainer(tmp_path / reference, max_steps=3, callbacks=[losses])
        fit.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, val=val, batch_size=4)))
        runs[reference] = module, losses.losses, fit.callback_metrics["val/loss"].item()
    (_, live_losses, live_val), (pre, pre_losses, pre_val) = runs["copy"], runs["precomputed"]
    assert pre.ref_model is None  # released before training
    assert pre.reference.tables["train"].shape == (32, 2) and not pre.reference.tables["train"].isnan().any()
    assert len(pre_losses) == 3 and abs(pre_losses[-1] - live_losses[0]) > 1e-3  # the losses moved
    assert pre_losses == pytest.approx(live_losses, rel=1e-5)
    assert pre_val == pytest.approx(live_val, rel=1e-5)

    # After training, new pairs' reference comes from the starting weights, not the trained policy.
    test = PreferenceDataModule(test=write_jsonl(tmp_path / "test.jsonl", read_jsonl(val)[:6]), batch_size=4)
    trainer(tmp_path).test(pre, datamodule=pre.connect(test))
    start = DPOModule(model=TINY_MODEL)
    start.configure_model()
    batch = next(iter(test.test_dataloader()))
    torch.testing.assert_close(pre.reference.tables["test"][batch.index], start.reference_logps(batch),
                               rtol=1e-5, atol=0)
    assert pre.ref_model is None


def test_cache_is_reused_unless_reference_data_or_tokenisation_change(tmp_path, small_data):
    cache = tmp_path / "cache"
    _, val = small_data

    def val_logps(val=val, max_length=None, ref_model=None, beta=0.1):
        module = DPOModule(model=TINY_MODEL, ref_model=ref_model, reference="precomputed", beta=beta,
                           ref_cache_dir=str(cache))
        trainer(tmp_path).validate(module, datamodule=module.connect(PreferenceDataModule(val=val, max_length=max_length,
                                                                            batch_size=4)))
        return module.reference.tables["val"]

    first = val_logps()
    (entry,) = cache.iterdir()
    save_table(cache, entry.name, load_table(cache, entry.name) + 1000.0, {})  # marked: only a run that reads it
    torch.testing.assert_close(val_logps(beta=0.5), first + 1000.0, rtol=0, atol=0)

    other_rows = write_jsonl(tmp_path / "other.jsonl", read_jsonl(val)[1:])
    changed_data = val_logps(val=other_rows)
    torch.testing.assert_close(changed_data, first[1:], rtol=1e-5, atol=0)  # the same pairs, recomputed
    changed_tokenisation = val_logps(max_length=24)
    assert (changed_tokenisation > first).any()  # responses cut short: fewer tokens, higher log-probs

    reference_dir = tmp_path / "reference"
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL))
    model.save_pretrained(reference_dir)
    same_weights = val_logps(ref_model=str(reference_dir))
    torch.testing.assert_close(same_weights, first, rtol=1e-5, atol=0)
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
    model.save_pretrained(reference_dir)  # new weights at the same path
    changed_reference = val_logps(ref_model=str(reference_dir))
    assert not torch.allclose(changed_reference, same_weights, rtol=1e-3)
    assert len(list(cache.iterdir())) == 5  # first, data, tokenisation, two references


def test_sync_reference_mixes_in_the_policy_like_trl(tmp_path, small_data):
    train, val = small_data
    states = {}

    class Snapshot(L.Callback):  # runs before the module's own callbacks in each hook
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            states[trainer.global_step] = copy.deepcopy(pl_module.policy), copy.deepcopy(pl_module.ref_model)

    module = DPOModule(model=TINY_MODEL, reference="sync", sync_steps=2, sync_alpha=0.3, lr=1e-2)
    fit = trainer(tmp_path, max_steps=3, callbacks=[Snapshot()], enable_checkpointing=True)
    fit.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, val=val, batch_size=4)))

    start = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL))
    for step in (1, 2):  # no update before step 2
        for param, start_param in zip(states[step][1].parameters(), start.parameters()):
            assert torch.equal(param, start_param)
    policy, expected = states[2]
    SyncRefModelCallback._sync_target_model(policy, expected, 0.3)
    for (name, param), expected_param in zip(module.ref_model.named_parameters(), expected.parameters()):
        assert torch.equal(param, expected_param), name  # updated once, after step 2, as TRL would
    assert not torch.equal(module.ref_model.lm_head.weight, start.lm_head.weight)
    checkpoint = torch.load(fit.checkpoint_callback.last_model_path or fit.checkpoint_callback.best_model_path,
                            weights_only=False)
    torch.testing.assert_close(checkpoint["state_dict"]["ref_model.lm_head.weight"], module.ref_model.lm_head.weight)
