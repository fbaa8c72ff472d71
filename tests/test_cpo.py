"""CPO and AlphaPO: the losses by hand, by gradient and against TRL 1.16's CPOTrainer.cpo_loss; the module trains."""

import math
import types
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from prefmodule import CPOModule, PreferenceDataModule, SimPOModule
from prefmodule.errors import ConfigError
from prefmodule.objectives.losses import alphapo_rewards, cpo_loss, nll_loss

from conftest import TINY_MODEL
from test_logps import a_batch
from test_losses import _rand_logps, logsig


CONFIGS = Path(__file__).parent.parent / "configs"


def test_cpo_losses_by_hand():
    a, b = torch.tensor([-2.0, -6.0], dtype=torch.float64), torch.tensor([-5.0, -4.0], dtype=torch.float64)
    # d = 3, -2
    sigmoid, chosen_rewards, _ = cpo_loss(a, b, beta=0.5)
    torch.testing.assert_close(sigmoid, torch.tensor([-logsig(1.5), -logsig(-1.0)], dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, torch.tensor([-1.0, -3.0], dtype=torch.float64))
    hinge = cpo_loss(a, b, beta=0.5, loss_type="hinge")[0]
    torch.testing.assert_close(hinge, torch.tensor([0.0, 2.0], dtype=torch.float64))
    ipo = cpo_loss(a, b, beta=0.5, loss_type="ipo")[0]  # (d - 1)^2
    torch.testing.assert_close(ipo, torch.tensor([4.0, 9.0], dtype=torch.float64))
    simpo = cpo_loss(a, b, beta=0.5, loss_type="simpo", gamma=0.4, label_smoothing=0.1)[0]
    z = torch.tensor([1.5 - 0.4, -1.0 - 0.4], dtype=torch.float64)
    torch.testing.assert_close(simpo, -0.9 * torch.nn.functional.logsigmoid(z) - 0.1 * torch.nn.functional.logsigmoid(-z))


def test_alphapo_rewards_by_hand():
    logps = torch.tensor([-1.0, -0.5], dtype=torch.float64)
    # (1 - p^-alpha) / alpha with p = e^logp: alpha = 0.5 -> (1 - e^0.5) / 0.5, (1 - e^0.25) / 0.5
    torch.testing.assert_close(alphapo_rewards(logps, 0.5),
                               torch.tensor([(1 - math.exp(0.5)) / 0.5, (1 - math.exp(0.25)) / 0.5],
                                            dtype=torch.float64))
    torch.testing.assert_close(alphapo_rewards(logps, 1e-9), logps)  # alpha -> 0: the log-prob
    assert torch.equal(alphapo_rewards(logps, 0.0), logps)
    losses, chosen_rewards, _ = cpo_loss(logps[:1], logps[1:], beta=2.0, alpha=0.5)
    torch.testing.assert_close(chosen_rewards, 2.0 * alphapo_rewards(logps[:1], 0.5))
    margin = alphapo_rewards(logps[:1], 0.5) - alphapo_rewards(logps[1:], 0.5)
    torch.testing.assert_close(losses, -torch.nn.functional.logsigmoid(2.0 * margin))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo", "simpo"])
@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_cpo_gradcheck_float64(loss_type, alpha):
    a = _rand_logps(5, -3.0, -0.1, 1).requires_grad_(True)
    b = _rand_logps(5, -3.0, -0.1, 2).requires_grad_(True)
    smoothing = 0.1 if loss_type in ("sigmoid", "simpo") else 0.0
    assert torch.autograd.gradcheck(
        lambda x, y: cpo_loss(x, y, beta=0.7, loss_type=loss_type, alpha=alpha, label_smoothing=smoothing)[0],
        (a, b))


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("hinge", 0.0), ("ipo", 0.0),
                                            ("simpo", 0.0), ("simpo", 0.1)])
@pytest.mark.parametrize("alpha", [0.0, 0.25, -0.4])
def test_cpo_equals_trl(loss_type, eps, alpha):
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 0.3, 0.6
    a = _rand_logps(16, -4.0, -0.05, 31).float()
    b = _rand_logps(16, -4.0, -0.05, 32).float()
    stand_in = types.SimpleNamespace(alpha=alpha, loss_type=loss_type, simpo_gamma=gamma, beta=beta,
                                     label_smoothing=eps, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen, trl_rejected = CPOTrainer.cpo_loss(stand_in, a, b)
    losses, chosen, rejected = cpo_loss(a, b, beta=beta, loss_type=loss_type, label_smoothing=eps, gamma=gamma,
                                        alpha=alpha)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chosen, trl_chosen, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rejected, trl_rejected, rtol=1e-5, atol=1e-6)


def test_alphapo_stays_finite_where_trl_overflows():
    logps = torch.tensor([-200.0])  # a long response's summed log-prob: exp underflows in float32
    rewards = alphapo_rewards(logps, 0.25)
    assert torch.isfinite(rewards).all() and rewards.item() == pytest.approx(-math.expm1(50.0) / 0.25, rel=1e-5)


def test_bad_settings_fail_at_construction():
    with pytest.raises(ConfigError, match="loss_type"):
        CPOModule(model=TINY_MODEL, loss_type="kto_pair")
    with pytest.raises(ConfigError, match="label_smoothing"):
        CPOModule(model=TINY_MODEL, loss_type="hinge", label_smoothing=0.1)


@pytest.mark.parametrize("loss_type, alpha", [("sigmoid", 0.0), ("simpo", 0.5)], ids=["cpo", "alphapo"])
def test_module_loss_and_training(loss_type, alpha, tmp_path, small_data, demo_rows):
    module = CPOModule(model=TINY_MODEL, loss_type=loss_type, alpha=alpha, cpo_alpha=0.7, lr=1e-2)
    module.configure_model()
    batch = a_batch(module, demo_rows[:4])
    with torch.no_grad():
        outputs = module.batch_outputs(batch)[0]
        chosen, rejected = module.model_stats(module.policy, batch.sequences).split()
    logps = (chosen.avg_logps, rejected.avg_logps) if loss_type == "simpo" else (chosen.logps, rejected.logps)
    expected = cpo_loss(*logps, beta=0.1, loss_type=loss_type, alpha=alpha)[0].mean() + 0.7 * nll_loss(
        chosen.logps, chosen.lengths)
    torch.testing.assert_close(outputs.loss, expected)
    assert module.length_normalized == (loss_type == "simpo")

    train, val = small_data
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, val_check_interval=2, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, val=val, batch_size=4)))
    metrics = trainer.callback_metrics
    assert math.isfinite(metrics["val/loss"].item()) and metrics["val/nll_loss"] > 0
    with torch.no_grad():
        assert module.batch_outputs(batch)[0].loss < outputs.loss  # two steps at lr 1e-2 lowered it


def test_quickstart_config_builds_cpo(capsys):
    from prefmodule.cli import main

    with pytest.raises(SystemExit):
        main(["fit", "--config", str(CONFIGS / "cpo.yaml"), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]
    assert model["class_path"] == "prefmodule.CPOModule" and model["init_args"]["cpo_alpha"] == 1.0


@pytest.mark.parametrize("config, module_class, options", [
    ("simpo.yaml", SimPOModule, {"gamma": 0.3, "sft_weight": 0.2}),
    ("cpo.yaml", CPOModule, {"loss_type": "simpo", "simpo_gamma": 0.3, "cpo_alpha": 0.2}),
], ids=["simpo", "cpo"])
def test_simpo_is_cpos_loss_and_both_reload_from_their_checkpoints(config, module_class, options, tmp_path,
                                                                   small_data):
    from prefmodule.cli import main
    from test_cli import fit_args

    train, val = small_data
    fitted = main(fit_args(config, tmp_path, train, val, *(f"--model.{k}={v}" for k, v in options.items()))).model
    assert fitted.loss.loss_type == "simpo" and fitted.loss.gamma == 0.3 and fitted.nll_weight == 0.2
    assert dict(fitted.hparams).items() >= options.items()
    saved = fitted.trainer.checkpoint_callback
    ckpt = saved.last_model_path or saved.best_model_path
    validated = main(["validate", "--config", str(CONFIGS / config), f"--data.val={val}", f"--ckpt_path={ckpt}",
                      f"--trainer.default_root_dir={tmp_path}", "--trainer.enable_progress_bar=false"]).model
    reloaded = module_class.load_from_checkpoint(ckpt)
    for module in (validated, reloaded):
        assert type(module) is module_class and (module.loss, module.nll_weight) == (fitted.loss, 0.2)


def test_simpo_module_scores_as_cpo_simpo(demo_rows):
    simpo = SimPOModule(model=TINY_MODEL, beta=2.0, gamma=0.4, label_smoothing=0.1, sft_weight=0.3)
    cpo = CPOModule(model=TINY_MODEL, beta=2.0, loss_type="simpo", simpo_gamma=0.4, label_smoothing=0.1,
                    cpo_alpha=0.3)
    for module in (simpo, cpo):
        module.configure_model()
    cpo.policy.load_state_dict(simpo.policy.state_dict())
    batch = a_batch(simpo, demo_rows[:4])
    with torch.no_grad():
        ours, theirs = simpo.batch_outputs(batch)[0], cpo.batch_outputs(batch)[0]
    assert simpo.length_normalized and torch.equal(ours.loss, theirs.loss)
    assert torch.equal(ours.chosen_rewards, theirs.chosen_rewards) and set(ours.extra) == {"nll_loss"}
    with pytest.raises(ConfigError, match="sft_weight must be >= 0"):
        SimPOModule(model=TINY_MODEL, sft_weight=-1.0)
