"""KTO: the loss by hand and by gradient, `validate` equal to TRL 1.16's KTOTrainer.evaluate() (on a file, through
the datamodule, and on a hand-built batch), every reference mode, predictions on pairs and on rows, a few training
steps.

Batches other than the parity test's file are built here by hand as the unpaired-batch contract says (sequences
0..n-1 prompt + completion, n..2n-1 prompt + the previous row's completion, ``label``, ``index``)."""

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefmodule import KTOModule, PreferenceDataModule
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.tokenize import tokenize_pair
from prefmodule.errors import ConfigError
from prefmodule.objectives.losses import KTOLoss, kto_kl, kto_loss
from prefmodule.objectives.kto import kto_weight_advice
from prefmodule.paths import resolve
from prefmodule.reference.modes import SoftUpdate

from conftest import TINY_MODEL, write_jsonl
from test_logps import packed
from test_losses import sig


CONFIGS = Path(__file__).parent.parent / "configs"


def unpaired_rows(pairs, labels):
    """Row i: pair i's chosen answer when ``labels[i]``, else its rejected one."""
    return [{"prompt": p["prompt"], "completion": p["chosen"] if good else p["rejected"], "label": good}
            for p, good in zip(pairs, labels)]


def prepare(tokenizer, rows, batch_size, first_index=0):
    """Tokenised rows; each row's KL completion is the previous row's completion within its chunk of
    ``batch_size`` rows (the chunk's first row takes its last row's), fixed here as the contract says."""
    items = []
    for start in range(0, len(rows), batch_size):
        chunk = [tokenize_pair(tokenizer, r["prompt"], r["completion"], r["completion"])
                 for r in rows[start: start + batch_size]]
        completions = [t["chosen_ids"] for t in chunk]
        for i, (t, kl) in enumerate(zip(chunk, completions[-1:] + completions[:-1])):
            items.append({"index": first_index + start + i, "prompt_ids": t["prompt_ids"],
                          "completion_ids": t["chosen_ids"], "kl_completion_ids": kl,
                          "label": rows[start + i]["label"]})
    return items


class Collate:
    """Sequences 0..n-1 prompt + completion, then (``kl``) n..2n-1 prompt + KL completion; ``label``, ``index``."""

    def __init__(self, pad_token_id, kl=True):
        self.rows, self.kl = PreferenceCollator(pad_token_id), kl

    def __call__(self, items):
        if not self.kl:  # only the completions
            items = [{key: value for key, value in x.items() if key != "kl_completion_ids"} for x in items]
        return self.rows(items)


def collate(tokenizer, rows, first_index=0, kl=True):
    """``rows`` as one batch."""
    return Collate(tokenizer.pad_token_id, kl)(prepare(tokenizer, rows, len(rows), first_index))


class Rows(L.LightningDataModule):
    """Train and val rows in order, in batches of ``batch_size``."""

    def __init__(self, tokenizer, train, val, batch_size=4, kl=True):
        super().__init__()
        self.items = {"train": prepare(tokenizer, train, batch_size), "val": prepare(tokenizer, val, batch_size)}
        self.batch_size, self.collate = batch_size, Collate(tokenizer.pad_token_id, kl)

    def train_dataloader(self):
        return DataLoader(self.items["train"], batch_size=self.batch_size, collate_fn=self.collate)

    def val_dataloader(self):
        return DataLoader(self.items["val"], batch_size=self.batch_size, collate_fn=self.collate)


# ----- the loss ----------------------------------------------------------------------------------------------
def test_kto_loss_by_hand():
    logps, ref = torch.tensor([-5.0, -7.0, -4.0]), torch.tensor([-6.0, -6.0, -4.0])  # r = 1, -1, 0
    desirable = torch.tensor([True, False, True])
    losses, rewards = kto_loss(logps, ref, desirable, torch.tensor(0.5), beta=0.2, desirable_weight=2.0,
                               undesirable_weight=0.5)
    expected = [2.0 * (1 - sig(0.2 * (1 - 0.5))), 0.5 * (1 - sig(0.2 * (0.5 + 1))), 2.0 * (1 - sig(0.2 * -0.5))]
    torch.testing.assert_close(losses, torch.tensor(expected))
    torch.testing.assert_close(rewards, torch.tensor([0.2, -0.2, 0.0]))
    apo, _ = kto_loss(logps, ref, desirable, torch.tensor(0.5), beta=0.2, loss_type="apo_zero_unpaired")
    torch.testing.assert_close(apo, torch.tensor([1 - sig(0.2), sig(-0.2), 0.5]))  # z0 plays no part
    with pytest.raises(ValueError, match="loss_type"):
        kto_loss(logps, ref, desirable, loss_type="kto_pair")


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_loss_gradcheck_float64(loss_type):
    g = torch.Generator().manual_seed(0)
    logps = (-30 * torch.rand(6, generator=g, dtype=torch.float64)).requires_grad_(True)
    ref = -30 * torch.rand(6, generator=g, dtype=torch.float64)
    desirable = torch.tensor([True, False, True, True, False, False])
    assert torch.autograd.gradcheck(
        lambda x: kto_loss(x, ref, desirable, torch.tensor(0.3, dtype=torch.float64), beta=0.1, loss_type=loss_type,
                           desirable_weight=1.3, undesirable_weight=0.7)[0], (logps,))


def test_kto_reference_point_is_a_clamped_detached_mean_over_ranks():
    policy = torch.tensor([-5.0, -6.0], requires_grad=True)
    assert kto_kl(policy, torch.tensor([-6.0, -6.0])).item() == pytest.approx(0.5)
    assert kto_kl(policy, torch.tensor([-4.0, -4.0])).item() == 0.0  # the mean, -1.5, clamped at 0
    assert not kto_kl(policy, torch.zeros(2)).requires_grad
    # two ranks' means 0.5 and -0.3: (0.5 - 0.3) / 2
    other_rank = lambda mean: torch.stack([mean, torch.tensor(-0.3)])  # noqa: E731
    assert kto_kl(policy, torch.tensor([-6.0, -6.0]), other_rank).item() == pytest.approx(0.1)


def test_weight_advice_follows_the_papers_range():
    assert kto_weight_advice(100, 100, 1.0, 1.0) is None
    assert kto_weight_advice(100, 80, 1.0, 1.0) is None  # 1.25
    advice = kto_weight_advice(100, 300, 1.0, 1.0)  # 1/3: weigh the desirable rows 3 to 4 times more
    assert "[3, 4]" in advice and "0.333" in advice
    assert kto_weight_advice(100, 300, 3.5, 1.0) is None


# ----- TRL parity -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """The tiny Llama moved away from the shipped weights: the shipped policy's rewards and KL against it are
    not zero (it fits the demo data better than this reference, so the KL estimate is positive)."""
    model = AutoModelForCausalLM.from_pretrained(resolve(TINY_MODEL))
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn_like(param))
    path = tmp_path_factory.mktemp("reference")
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(resolve(TINY_MODEL)).save_pretrained(path)
    return str(path)


def trl_evaluate(reference_dir, rows, tmp_path, **config):
    from datasets import Dataset
    from trl import KTOConfig, KTOTrainer

    args = KTOConfig(output_dir=str(tmp_path / "trl"), per_device_train_batch_size=len(rows),
                     per_device_eval_batch_size=len(rows), report_to="none", use_cpu=True, bf16=False,
                     gradient_checkpointing=False, disable_tqdm=True, **config)
    reference = AutoModelForCausalLM.from_pretrained(reference_dir)
    dataset = Dataset.from_list(rows)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(model=resolve(TINY_MODEL), ref_model=reference, args=args, train_dataset=dataset,
                             eval_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(reference_dir))
        return trainer.evaluate()


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_validate_equals_trl_evaluate(loss_type, reference_dir, demo_rows, tmp_path):
    rows = unpaired_rows(demo_rows[:7], [True, False, True, True, False, True, True])
    config = dict(beta=0.3, loss_type=loss_type, desirable_weight=0.8, undesirable_weight=1.9)
    theirs = trl_evaluate(reference_dir, rows, tmp_path, **config)
    module = KTOModule(model=TINY_MODEL, ref_model=reference_dir, **config)
    trainer = L.Trainer(default_root_dir=tmp_path, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    val = write_jsonl(tmp_path / "val.jsonl", rows)  # one batch holds the file: TRL's evaluate() has one too
    data = PreferenceDataModule(val=val, batch_size=8, cache_dir=str(tmp_path / "cache"))
    ours = trainer.validate(module, datamodule=module.connect(data), verbose=False)[0]
    batch = collate(module.tokenizer, rows, kl=loss_type == "kto")  # the batch contract, built by hand
    by_hand = trainer.validate(module, dataloaders=DataLoader([batch], batch_size=None), verbose=False)[0]
    # padded by hand, packed by the datamodule: equal within float32 rounding of the two attention layouts
    assert by_hand == pytest.approx(ours, rel=1e-5)
    names = ["loss", "kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
             "logits/chosen", "logits/rejected"]
    for name in names:
        assert ours[f"val/{name}"] == pytest.approx(theirs[f"eval_{name}"], rel=1e-3, abs=1e-6), name
    assert "val/rewards/accuracies" not in ours
    assert abs(theirs["eval_rewards/margins"]) > 1e-2 and theirs["eval_loss"] > 0
    if loss_type == "kto":
        assert theirs["eval_kl"] > 1e-3  # a real reference point, not the clamp
    else:
        assert ours["val/kl"] == 0.0


# ----- reference modes, training, predictions -------------------------------------------------------------
def fit(module, data, root, steps=2):
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(outputs["loss"].item())

    trainer = L.Trainer(default_root_dir=root, max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, val_check_interval=steps,
                        callbacks=[Record()])
    trainer.fit(module, datamodule=module.connect(data))
    return losses, trainer.callback_metrics


@pytest.fixture
def rows(demo_rows):
    return unpaired_rows(demo_rows[:8], [True, False] * 4), unpaired_rows(demo_rows[100:104], [True, False, False, True])


def test_precomputed_reference_trains_as_the_copy(rows, tmp_path):
    train, val = rows
    runs = {}
    for mode in ("copy", "precomputed"):
        L.seed_everything(0)
        module = KTOModule(model=TINY_MODEL, reference=mode, lr=1e-2, ref_cache_dir=str(tmp_path / "cache"))
        runs[mode] = module, *fit(module, Rows(module.tokenizer, train, val), tmp_path / mode)
    (copy, copy_losses, copy_metrics), (pre, losses, metrics) = runs["copy"], runs["precomputed"]
    assert losses == pytest.approx(copy_losses, rel=1e-5) and copy_losses[0] != copy_losses[1]  # it trained
    for name in ("val/loss", "val/kl", "val/rewards/margins", "val/logps/chosen"):
        assert metrics[name].item() == pytest.approx(copy_metrics[name].item(), rel=1e-5, abs=1e-7), name
    assert metrics["val/kl"] > 0
    table = pre.reference.tables["train"]
    assert table.shape == (8, 2) and pre.ref_model is None  # (completion, KL completion) per row
    start = KTOModule(model=TINY_MODEL)
    start.configure_model()
    torch.testing.assert_close(table[:4], start.reference_logps(collate(copy.tokenizer, train[:4])), rtol=1e-5,
                               atol=1e-5)


def test_sync_reference_is_kept_saved_and_updated():
    module = KTOModule(model=TINY_MODEL, reference="sync", sync_steps=3, sync_alpha=0.5)
    module.configure_model()
    assert "ref_model.lm_head.weight" in module.state_dict()  # it changes in training: checkpoints hold it
    (update,) = [c for c in module.configure_callbacks() if isinstance(c, SoftUpdate)]
    assert (update.steps, update.alpha) == (3, 0.5)


def test_adapter_reference_is_the_base_model(rows):
    train, _ = rows
    adapter = KTOModule(model=TINY_MODEL, lora={"r": 4, "lora_alpha": 8}, reference="adapter")
    copy = KTOModule(model=TINY_MODEL)
    for module in (adapter, copy):
        module.configure_model()
    with torch.no_grad():
        for name, param in adapter.policy.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    batch = collate(adapter.tokenizer, train[:4])
    torch.testing.assert_close(adapter.reference_logps(batch), copy.reference_logps(batch), rtol=1e-6, atol=1e-6)
    assert adapter.reference_logps(batch).shape == (4, 2) and adapter.ref_model is None
    with torch.no_grad():
        outputs = adapter.batch_outputs(batch)[0]
    assert outputs.desirable_rewards.abs().min() > 1e-4  # the adapters moved the policy from its reference


def test_apo_zero_unpaired_needs_no_kl_rows_padded_or_packed(rows):
    train, _ = rows
    module = KTOModule(model=TINY_MODEL, loss_type="apo_zero_unpaired")
    module.configure_model()
    assert not module.kl_completions and module.unpaired
    batch = collate(module.tokenizer, train[:4], kl=False)
    assert batch.sequences.input_ids.shape[0] == 4
    with torch.no_grad():
        padded, in_one_row = module.batch_outputs(batch)[0], module.batch_outputs(packed(batch))[0]
    torch.testing.assert_close(in_one_row.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert padded.desirable_rewards.numel() == 2 and padded.extra["kl"] == 0


def test_kto_options_are_checked_once_when_the_module_builds_its_loss(rows, monkeypatch):
    bad_loss_type = r"^loss_type must be one of \('kto', 'apo_zero_unpaired'\), got 'kto_pair'$"
    with pytest.raises(ValueError, match=bad_loss_type):
        KTOLoss(loss_type="kto_pair")
    with pytest.raises(ValueError, match=r"^desirable_weight and undesirable_weight must be > 0, got 1.0, 0.0$"):
        KTOLoss(undesirable_weight=0.0)
    with pytest.raises(ConfigError, match=bad_loss_type):
        KTOModule(model=TINY_MODEL, loss_type="kto_pair")
    module = KTOModule(model=TINY_MODEL, beta=0.3, undesirable_weight=2.0)
    assert module.loss == KTOLoss(0.3, "kto", 1.0, 2.0)
    module.configure_model()

    def not_built_again(self, *args, **kwargs):
        raise AssertionError("KTOLoss built during a step")

    monkeypatch.setattr(KTOLoss, "__init__", not_built_again)
    train, _ = rows
    with torch.no_grad():
        outputs = module.batch_outputs(collate(module.tokenizer, train[:4]))[0]
    assert torch.isfinite(outputs.loss) and outputs.extra["kl"] >= 0


def test_predict_scores_pairs_and_rows(rows, demo_rows):
    module = KTOModule(model=TINY_MODEL, ref_model=TINY_MODEL)
    module.configure_model()
    with torch.no_grad():
        for param in module.policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    pairs = [{"index": i, **tokenize_pair(module.tokenizer, r["prompt"], r["chosen"], r["rejected"])}
             for i, r in enumerate(demo_rows[:3])]
    pair_batch = PreferenceCollator(module.tokenizer.pad_token_id)(pairs)
    with torch.no_grad():
        predictions = module.predict_step(pair_batch, 0)
        chosen, rejected = module.model_stats(module.policy, pair_batch.sequences).split()
        reference = module.reference_logps(pair_batch)
    assert [p["index"] for p in predictions] == [0, 1, 2]
    for p, c, r, ref in zip(predictions, chosen.logps, rejected.logps, reference):
        assert p["chosen_reward"] == pytest.approx(0.1 * (c - ref[0]).item(), rel=1e-5)
        assert p["rejected_reward"] == pytest.approx(0.1 * (r - ref[1]).item(), rel=1e-5)
        assert p["preferred"] == ("chosen" if p["chosen_reward"] > p["rejected_reward"] else "rejected")
    train, _ = rows
    with torch.no_grad():
        row_predictions = module.predict_step(collate(module.tokenizer, train[:4], first_index=10), 0)
    assert [(p["index"], p["label"]) for p in row_predictions] == [(10, True), (11, False), (12, True), (13, False)]
    assert all(p["reward"] != 0 for p in row_predictions)


def test_unbalanced_weights_warn_when_training_starts(rows, tmp_path):
    train, val = rows
    module = KTOModule(model=TINY_MODEL, desirable_weight=3.0, lr=1e-3)
    with pytest.warns(UserWarning, match=r"desirable_weight in \[1, 1.33\]"):
        fit(module, Rows(module.tokenizer, train, val), tmp_path, steps=1)


def test_quickstart_config_builds_kto(capsys):
    from prefmodule.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "kto.yaml"), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == "prefmodule.KTOModule"
    assert model["init_args"]["loss_type"] == "kto" and model["init_args"]["reference"] == "copy"
