"""Tests for prefmodule.objectives.losses.policy_gradient: hand-computed advantages and losses, analytic
gradients of the clipped objective, option checks, and parity with TRL 1.16's own GRPOTrainer/RLOOTrainer code."""

from __future__ import annotations

import inspect
import itertools
import math
import textwrap
import types
from collections import defaultdict

import pytest
import torch

from prefmodule.errors import ConfigError
from prefmodule.objectives.losses import (
    GRPO_LOSS_TYPES,
    IMPORTANCE_SAMPLING_LEVELS,
    SCALE_REWARDS,
    GRPOAdvantages,
    GRPOLoss,
    RLOOAdvantages,
    check_grpo_options,
    grpo_advantages,
    grpo_loss,
    rloo_advantages,
    rloo_loss,
)

NAN = float("nan")
EPS = 1e-4  # the constant in the std division


def col(*values):
    """One reward function's outputs as a ``[N, 1]`` float64 tensor."""
    return torch.tensor(values, dtype=torch.float64).unsqueeze(1)


# --------------------------------------------------------------------------------------------
# GRPO advantages by hand
# --------------------------------------------------------------------------------------------


def test_grpo_group_scaling_by_hand():
    # G=3: group 1 rewards 2, 0, 1 (mean 1, Bessel std 1); group 2 all 1 (std 0 -> advantages 0)
    out = grpo_advantages(col(2, 0, 1, 1, 1, 1), num_generations=3)
    expected = [1 / (1 + EPS), -1 / (1 + EPS), 0, 0, 0, 0]
    torch.testing.assert_close(out.advantages, torch.tensor(expected, dtype=torch.float64))
    assert out.std_is_zero.tolist() == [False] * 3 + [True] * 3
    assert out.rewards.tolist() == [2, 0, 1, 1, 1, 1]


def test_grpo_g2_none_and_batch_by_hand():
    # G=2: groups (1, 0) and (3, 3)
    r = col(1, 0, 3, 3)
    s = math.sqrt(0.5)  # std of (1, 0)
    group = grpo_advantages(r, 2, scale_rewards="group").advantages
    torch.testing.assert_close(group, torch.tensor([0.5 / (s + EPS), -0.5 / (s + EPS), 0, 0], dtype=torch.float64))
    none = grpo_advantages(r, 2, scale_rewards="none")
    torch.testing.assert_close(none.advantages, torch.tensor([0.5, -0.5, 0, 0], dtype=torch.float64))
    assert none.std_is_zero.tolist() == [False, False, True, True]  # logged from the group std, as TRL
    # batch: std of (1, 0, 3, 3): mean 7/4, squared deviations 9/16 + 49/16 + 25/16 + 25/16 = 108/16, / 3
    sb = math.sqrt(108 / 16 / 3)
    batch = grpo_advantages(r, 2, scale_rewards="batch")
    torch.testing.assert_close(batch.advantages, torch.tensor([0.5 / (sb + EPS), -0.5 / (sb + EPS), 0, 0],
                                                              dtype=torch.float64))
    assert not batch.std_is_zero.any()


def test_grpo_unscorable_rows_by_hand():
    # group 1: 4, None, 0 -> the None row is left out (mean 2, std sqrt(8)) and gets 0;
    # group 2: 5, None, None -> one scorable completion: std NaN, every advantage 0;
    # group 3: all None -> all 0, rewards NaN
    r = col(4, NAN, 0, 5, NAN, NAN, NAN, NAN, NAN)
    out = grpo_advantages(r, 3)
    s = math.sqrt(8)
    torch.testing.assert_close(out.advantages, torch.tensor([2 / (s + EPS), 0, -2 / (s + EPS), 0, 0, 0, 0, 0, 0],
                                                            dtype=torch.float64))
    assert torch.isnan(out.rewards).tolist() == [False, True, False, False, True, True, True, True, True]
    assert not out.std_is_zero.any()  # a NaN std is not "zero" (TRL's isclose)


def test_grpo_weighted_rewards_skip_none_by_hand():
    # two reward functions, weights (1, 0.5); row 2's second reward is None: it counts its first only
    r = torch.tensor([[1.0, 2.0], [0.0, NAN], [NAN, NAN], [1.0, 0.0]], dtype=torch.float64)
    out = grpo_advantages(r, 2, reward_weights=torch.tensor([1.0, 0.5]), scale_rewards="none")
    torch.testing.assert_close(out.rewards[[0, 1, 3]], torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64))
    assert math.isnan(out.rewards[2])
    # group 1: (2, 0) -> +-1; group 2: (NaN, 1) -> only row 3 scorable, its advantage 1 - 1 = 0
    torch.testing.assert_close(out.advantages, torch.tensor([1.0, -1.0, 0.0, 0.0], dtype=torch.float64))


def test_gdpo_normalize_then_sum_by_hand():
    # two rewards, two groups of G=2; each reward normalised in its group: (a, b) -> (+-k), k = 0.5 / (sqrt(.5) + eps)
    r = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0])
    k = 0.5 / (math.sqrt(0.5) + EPS)
    s = torch.tensor([k - 2 * k, -k + 2 * k, k + 2 * k, -k - 2 * k], dtype=torch.float64)
    expected = (s - s.mean()) / (s.std() + EPS)
    out = grpo_advantages(r, 2, reward_weights=w, aggregation="normalize_then_sum")
    torch.testing.assert_close(out.advantages, expected)
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 2.0, 3.0, 0.0], dtype=torch.float64))  # raw, for logs


def test_advantages_carry_no_gradient_and_keep_float32():
    r = torch.tensor([[1.0], [0.0]], requires_grad=True)
    out = grpo_advantages(r, 2)
    assert not out.advantages.requires_grad and out.advantages.dtype == torch.float32
    assert grpo_advantages(r.detach().bfloat16(), 2).advantages.dtype == torch.float32


def test_advantage_shape_errors():
    with pytest.raises(ValueError, match="groups"):
        grpo_advantages(col(1, 2, 3), 2)
    with pytest.raises(ValueError, match="reward_weights"):
        grpo_advantages(col(1, 2), 2, reward_weights=torch.ones(2))
    with pytest.raises(ValueError, match="kl"):
        rloo_advantages(col(1, 2), 2, beta=0.1)


# --------------------------------------------------------------------------------------------
# RLOO advantages by hand
# --------------------------------------------------------------------------------------------


def test_rloo_leave_one_out_by_hand():
    # G=3, rewards 3, 0, 6: baselines (0+6)/2, (3+6)/2, (3+0)/2
    out = rloo_advantages(col(3, 0, 6), 3)
    torch.testing.assert_close(out.advantages, torch.tensor([0.0, -4.5, 4.5], dtype=torch.float64))
    # a None sibling is left out of the baseline: (3, None, 6) -> 3 - 6, 0, 6 - 3
    out = rloo_advantages(col(3, NAN, 6, 2, NAN, NAN), 3)
    torch.testing.assert_close(out.advantages, torch.tensor([-3.0, 0, 3.0, 0, 0, 0], dtype=torch.float64))


def test_rloo_kl_penalty_and_normalisation_by_hand():
    kl = torch.tensor([1.0, -2.0, 0.0, 4.0], dtype=torch.float64)
    out = rloo_advantages(col(1, 1, 0, 2), 2, kl=kl, beta=0.5)
    # penalised rewards 0.5, 2, 0, 0 -> G=2 leave-one-out: A = r_i - r_other
    torch.testing.assert_close(out.advantages, torch.tensor([-1.5, 1.5, 0.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.rewards, torch.tensor([1.0, 1.0, 0.0, 2.0], dtype=torch.float64))  # no KL
    assert out.std_is_zero.tolist() == [False, False, True, True]
    normed = rloo_advantages(col(1, 1, 0, 2), 2, kl=kl, beta=0.5, normalize=True).advantages
    a = torch.tensor([-1.5, 1.5, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(normed, (a - a.mean()) / (a.std() + EPS))


# --------------------------------------------------------------------------------------------
# GRPO / RLOO loss by hand and analytic gradients
# --------------------------------------------------------------------------------------------


def test_grpo_loss_on_policy_values_and_gradient():
    # num_iterations 1: rho = 1 in value, so the loss is -sum m A / normaliser; d/dlogp_t = -A m_t / normaliser
    logps = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([2.0, -1.0], dtype=torch.float64)
    expected = {  # (loss, normaliser per token)
        "dapo": (-(2 * 3 - 1 * 2) / 5, torch.full((2, 3), 5.0)),
        "bnpo": (-(2 * 3 - 1 * 2) / 5, torch.full((2, 3), 5.0)),
        "dr_grpo": (-(2 * 3 - 1 * 2) / (2 * 4), torch.full((2, 3), 8.0)),
        "grpo": (-(2 - 1) / 2, torch.tensor([[6.0] * 3, [4.0] * 3])),
    }
    for loss_type, (value, normaliser) in expected.items():
        out = grpo_loss(logps, None, None, adv, mask, loss_type=loss_type, max_completion_length=4)
        assert out.loss.item() == pytest.approx(value)
        (grad,) = torch.autograd.grad(out.loss, logps)
        torch.testing.assert_close(grad, -adv[:, None] * mask / normaliser.double())
        assert out.per_token_kl is None and torch.all(out.ratio == 1)
    # dapo with the generation batch's token count
    out = grpo_loss(logps, None, None, adv, mask, num_items_in_batch=10)
    assert out.loss.item() == pytest.approx(-4 / 10)


def test_grpo_clipped_gradient_token_level():
    # one row per case, bnpo over 4 tokens (normaliser 4); rho = exp(logp - old)
    # rho 1.1, A>0: inside -> -A rho / 4; rho 1.5, A>0: clipped high -> 0; rho 1.5, A<0: unclipped side -> -A rho / 4
    # rho 0.5, A<0: clipped low -> 0
    rho = torch.tensor([1.1, 1.5, 1.5, 0.5], dtype=torch.float64)
    adv = torch.tensor([1.0, 2.0, -1.0, -3.0], dtype=torch.float64)
    old = torch.full((4, 1), -1.0, dtype=torch.float64)
    logps = (old + rho.log()[:, None]).requires_grad_()
    mask = torch.ones(4, 1)
    out = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", epsilon=0.2)
    clipped = torch.tensor([1.1, 1.2, 1.5, 0.8], dtype=torch.float64)
    assert out.loss.item() == pytest.approx((-(torch.minimum(rho * adv, clipped * adv))).mean().item())
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad.squeeze(1), torch.tensor([-1.1 / 4, 0.0, 1.5 / 4, 0.0], dtype=torch.float64))
    assert out.is_high_clipped.squeeze(1).tolist() == [False, True, False, False]
    assert out.is_low_clipped.squeeze(1).tolist() == [False, False, False, True]
    # DAPO's clip-higher: with epsilon_high 0.6, rho 1.5 with A>0 is inside the region again
    out = grpo_loss(logps, old, None, adv, mask, loss_type="bnpo", epsilon=0.2, epsilon_high=0.6)
    (grad,) = torch.autograd.grad(out.loss, logps)
    assert grad[1].item() == pytest.approx(-2 * 1.5 / 4)
    assert not out.is_high_clipped.any()


def test_grpo_kl_term_value_and_gradient():
    # on-policy, A = 0: the loss is beta * mean k3; d/dlogp (exp(ref - logp) - (ref - logp) - 1) = 1 - exp(ref - logp)
    logps = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    beta = 0.04
    out = grpo_loss(logps, None, ref, torch.zeros(1), torch.ones(1, 2), loss_type="bnpo", beta=beta)
    d = ref - logps.detach()
    k3 = d.exp() - d - 1
    torch.testing.assert_close(out.per_token_kl.detach(), k3)
    assert out.loss.item() == pytest.approx(beta * k3.mean().item())
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad, beta * (1 - d.exp()) / 2)
    assert out.metrics(torch.ones(1, 2))["kl"].item() == pytest.approx(k3.mean().item())
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(logps, None, None, torch.zeros(1), torch.ones(1, 2), beta=beta)


def test_grpo_sequence_level_gradient():
    # GSPO: rho = exp(mean_t m_t (logp_t - old_t)); grpo aggregation gives mean_i -min(rho_i A_i, clip A_i);
    # inside the clip region d/dlogp_t = -A_i rho_i m_t / (len_i * B)
    g = torch.Generator().manual_seed(0)
    old = -torch.rand(2, 3, generator=g, dtype=torch.float64)
    logps = (old + 0.05 * torch.randn(2, 3, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([1.5, -0.5], dtype=torch.float64)
    out = grpo_loss(logps, old, None, adv, mask, loss_type="grpo", importance_sampling_level="sequence")
    lengths = mask.sum(1, keepdim=True).double()
    rho = (((logps.detach() - old) * mask).sum(1, keepdim=True) / lengths).exp()
    assert out.ratio.shape == (2, 1) and torch.allclose(out.ratio, rho)
    assert ((0.8 < rho) & (rho < 1.2)).all()
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad, -adv[:, None] * rho * mask / (lengths * 2))


def test_rloo_loss_by_hand():
    # rho_i = exp(sum_t m_t (logp_t - old_t)); loss = mean -min(rho A, clip(rho) A); d/dlogp_t = -A rho m_t / B inside
    old = torch.tensor([[-1.0, -1.0], [-2.0, -0.5]], dtype=torch.float64)
    shift = torch.tensor([[0.05, 0.0], [0.5, 9.0]], dtype=torch.float64)  # row 2's second token is masked out
    logps = (old + shift).requires_grad_()
    mask = torch.tensor([[1, 1], [1, 0]])
    adv = torch.tensor([-1.0, 2.0], dtype=torch.float64)
    out = rloo_loss(logps, old, adv, mask)
    rho = torch.tensor([math.exp(0.05), math.exp(0.5)], dtype=torch.float64)
    assert out.loss.item() == pytest.approx((-(rho[0] * -1.0) - 1.2 * 2.0).item() / 2)
    (grad,) = torch.autograd.grad(out.loss, logps)
    torch.testing.assert_close(grad, torch.tensor([[rho[0].item() / 2] * 2, [0.0, 0.0]], dtype=torch.float64))
    assert out.is_high_clipped.squeeze(1).tolist() == [False, True] and not out.is_low_clipped.any()
    assert out.per_token_kl is None
    # on-policy: rho = 1, loss = -mean A
    assert rloo_loss(logps, None, adv, mask).loss.item() == pytest.approx(-0.5)


def test_losses_upcast_low_precision():
    logps = torch.randn(2, 3).bfloat16().requires_grad_()
    out = grpo_loss(logps, None, logps.detach() - 0.1, torch.ones(2), torch.ones(2, 3), beta=0.1)
    assert out.loss.dtype == torch.float32 and out.per_token_kl.dtype == torch.float32
    out.loss.backward()
    assert logps.grad.dtype == torch.bfloat16
    assert rloo_loss(logps, None, torch.ones(2), torch.ones(2, 3)).loss.dtype == torch.float32


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    old = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    ref = -torch.rand(3, 4, generator=g, dtype=torch.float64)
    logps = (old + 0.3 * torch.randn(3, 4, generator=g, dtype=torch.float64)).requires_grad_()
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -0.7, 0.3], dtype=torch.float64)
    for loss_type, level in itertools.product(GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS):
        assert torch.autograd.gradcheck(
            lambda x: grpo_loss(x, old, ref, adv, mask, loss_type=loss_type, beta=0.04, epsilon_high=0.28,
                                importance_sampling_level=level).loss, (logps,))
    assert torch.autograd.gradcheck(lambda x: rloo_loss(x, old, adv, mask).loss, (logps,))


# --------------------------------------------------------------------------------------------
# Option checks
# --------------------------------------------------------------------------------------------


def test_check_grpo_options_defaults_pass():
    check_grpo_options()
    check_grpo_options("grpo", "none", "sum_then_normalize", "sequence", 0.2, 0.28, 0.04, 2)


@pytest.mark.parametrize("kwargs, option", [
    (dict(loss_type="ppo"), "model.loss_type"),
    (dict(scale_rewards="std"), "model.scale_rewards"),
    (dict(aggregation="mean"), "model.multi_objective_aggregation"),
    (dict(aggregation="normalize_then_sum", scale_rewards="none"), "model.scale_rewards"),
    (dict(importance_sampling_level="batch"), "model.importance_sampling_level"),
    (dict(epsilon=0.0), "model.epsilon"),
    (dict(epsilon=1.0), "model.epsilon"),
    (dict(epsilon=float("nan")), "model.epsilon"),
    (dict(epsilon_high=-0.1), "model.epsilon_high"),
    (dict(beta=-0.01), "model.beta"),
    (dict(beta=float("inf")), "model.beta"),
    (dict(num_generations=1), "model.num_generations"),
    (dict(num_generations=4.0), "model.num_generations"),
])  # fmt: skip
def test_check_grpo_options_names_the_option(kwargs, option):
    with pytest.raises(ConfigError, match=f"^{option}="):
        check_grpo_options(**kwargs)


@pytest.mark.parametrize("build, says", [
    (lambda: GRPOLoss(loss_type="ppo"), r"^loss_type must be one of \('grpo', 'bnpo', 'dr_grpo', 'dapo'\), got 'ppo'"),
    (lambda: GRPOLoss(importance_sampling_level="batch"), r"^importance_sampling_level must be one of .*'batch'"),
    (lambda: GRPOAdvantages(2, scale_rewards="std"), r"^scale_rewards must be one of .*, got 'std'"),
    (lambda: GRPOAdvantages(2, aggregation="mean"), r"^aggregation must be one of .*, got 'mean'"),
    (lambda: GRPOAdvantages(0), r"^num_generations must be an integer >= 1, got 0"),
    (lambda: RLOOAdvantages(2.0), r"^num_generations must be an integer >= 1, got 2.0"),
])  # fmt: skip
def test_policy_gradient_settings_are_checked_when_built(build, says):
    with pytest.raises(ValueError, match=says):
        build()


def test_the_loss_functions_check_their_options_as_they_build_the_settings():
    logps, mask = torch.zeros(1, 2), torch.ones(1, 2)
    with pytest.raises(ValueError, match="^loss_type must be one of"):
        grpo_loss(logps, None, None, torch.zeros(1), mask, loss_type="ppo")
    with pytest.raises(ValueError, match="^scale_rewards must be one of"):
        grpo_advantages(col(1, 2), 2, scale_rewards="std")


# --------------------------------------------------------------------------------------------
# Parity with TRL 1.16's own code
# --------------------------------------------------------------------------------------------


def _identity(x, *args, **kwargs):
    return x


def _policy_batch(dtype, seed=0, batch_size=6, length=7):
    """Per-token log-probs far enough from the old ones that every clip case occurs; varied completion lengths."""
    g = torch.Generator().manual_seed(seed)
    old = -(0.1 + 3 * torch.rand(batch_size, length, generator=g, dtype=torch.float64))
    logps = old + 0.4 * torch.randn(batch_size, length, generator=g, dtype=torch.float64)
    ref = old + 0.3 * torch.randn(batch_size, length, generator=g, dtype=torch.float64)
    lengths = torch.tensor([7, 1, 4, 6, 2, 5])[:batch_size]
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    adv = torch.randn(batch_size, generator=g, dtype=torch.float64)
    return logps.to(dtype), old.to(dtype), ref.to(dtype), adv.to(dtype), mask


def trl_grpo_loss(logps, old_logps, ref_logps, advantages, mask, *, loss_type, beta, epsilon, epsilon_high,
                  importance_sampling_level, max_completion_length, num_items_in_batch):
    """TRL's real GRPOTrainer._compute_loss with a stand-in ``self``; returns ``(loss, metrics)``."""
    from trl import GRPOTrainer

    b, t = mask.shape
    entropies = torch.zeros(b, t, dtype=logps.dtype)
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=importance_sampling_level,
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        accelerator=types.SimpleNamespace(num_processes=1, reduce=_identity, gather=_identity,
                                          gather_for_metrics=_identity),
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": torch.as_tensor(num_items_in_batch),
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if beta != 0.0:
        inputs["ref_per_token_logps"] = ref_logps
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert "clip_ratio/high_max" in metrics, "TRL's code path did not run to the end"
    return loss, metrics


PARITY_CASES = list(itertools.product(GRPO_LOSS_TYPES, IMPORTANCE_SAMPLING_LEVELS, (0.0, 0.04), (None, 0.28)))


def grpo_parity(loss_type, level, beta, epsilon_high, dtype, on_policy=False):
    """``(max |loss diff|, max |grad diff|)`` between ours and TRL's on one batch; metrics checked too."""
    logps, old, ref, adv, mask = _policy_batch(dtype)
    old = None if on_policy else old
    options = dict(loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=epsilon_high,
                   importance_sampling_level=level, max_completion_length=9, num_items_in_batch=40)
    mine_x, theirs_x = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    mine = grpo_loss(mine_x, old, ref, adv, mask, **options)
    theirs, metrics = trl_grpo_loss(theirs_x, old, ref, adv, mask, **options)
    (mine_grad,) = torch.autograd.grad(mine.loss, mine_x)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_x)
    ours = {name: value.item() for name, value in mine.metrics(mask).items()}
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean", "clip_ratio/low_min",
                 "clip_ratio/high_max") + (("kl",) if beta else ()):
        assert ours[name] == pytest.approx(metrics[name], rel=1e-5, abs=1e-7), name
    return (mine.loss - theirs).abs().item(), (mine_grad - theirs_grad).abs().max().item(), ours


@pytest.mark.parametrize("loss_type, level, beta, epsilon_high", PARITY_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grpo_loss_equals_trl(loss_type, level, beta, epsilon_high, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    loss_diff, grad_diff, metrics = grpo_parity(loss_type, level, beta, epsilon_high, dtype)
    assert loss_diff <= tol and grad_diff <= tol
    if level == "token":  # the batch is off-policy enough to exercise both clip sides
        assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_grpo_loss_on_policy_equals_trl(loss_type):
    loss_diff, grad_diff, _ = grpo_parity(loss_type, "token", 0.04, None, torch.float32, on_policy=True)
    assert loss_diff <= 1e-6 and grad_diff <= 1e-6


def trl_rloo_loss(logps, old_seq_logps, advantages, mask, *, epsilon, epsilon_high):
    """TRL's real RLOOTrainer._compute_loss with a stand-in ``self``; returns ``(loss, metrics)``."""
    from trl import RLOOTrainer

    b, t = mask.shape
    trainer = types.SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        model=types.SimpleNamespace(training=True),
        accelerator=types.SimpleNamespace(num_processes=1, reduce=_identity, gather=_identity,
                                          gather_for_metrics=_identity),
        _metrics=defaultdict(lambda: defaultdict(list)),
    )
    inputs = {
        "prompt_ids": torch.zeros(b, 2, dtype=torch.long),
        "prompt_mask": torch.ones(b, 2, dtype=torch.long),
        "completion_ids": torch.zeros(b, t, dtype=torch.long),
        "completion_mask": mask,
        "old_logps": old_seq_logps,
        "advantages": advantages,
    }
    loss = RLOOTrainer._compute_loss(trainer, None, inputs)
    metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    assert "clip_ratio/region_mean" in metrics, "TRL's code path did not run to the end"
    return loss, metrics


def rloo_parity(epsilon_high, dtype):
    """``(max |loss diff|, max |grad diff|)`` between ours and TRL's; the clip metrics checked too."""
    logps, old, _, adv, mask = _policy_batch(dtype, seed=3)
    logps = old + (logps - old) / 4  # summed over a sequence, the log-ratios must stay near the clip range
    mine_x, theirs_x = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    mine = rloo_loss(mine_x, old, adv, mask, epsilon=0.2, epsilon_high=epsilon_high)
    theirs, metrics = trl_rloo_loss(theirs_x, (old * mask).sum(1), adv, mask, epsilon=0.2, epsilon_high=epsilon_high)
    (mine_grad,) = torch.autograd.grad(mine.loss, mine_x)
    (theirs_grad,) = torch.autograd.grad(theirs, theirs_x)
    ours = mine.metrics(mask)
    for name in ("clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"):
        assert ours[name].item() == pytest.approx(metrics[name]), name
    clipped = (mine.is_low_clipped | mine.is_high_clipped).squeeze(1)
    return (mine.loss - theirs).abs().item(), (mine_grad - theirs_grad).abs().max().item(), clipped


@pytest.mark.parametrize("epsilon_high", [None, 0.28])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rloo_loss_equals_trl(epsilon_high, dtype):
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    loss_diff, grad_diff, clipped = rloo_parity(epsilon_high, dtype)
    assert loss_diff <= tol and grad_diff <= tol
    assert clipped.any() and not clipped.all()


# ----- advantages: TRL's own source lines, run on our tensors -------------------------------------------------
#
# _generate_and_score_completions generates, scores and logs; the advantages are one block of it. Rather than
# transcribe that block, the tests cut it out of TRL's installed source (inspect.getsource, between two lines that
# open and close it) and execute it with the names it reads. If TRL changes those lines, the cut fails loudly.


def trl_block(method, first_line: str, last_line: str) -> str:
    """The source lines of ``method`` from the one holding ``first_line`` to the one holding ``last_line``."""
    lines = inspect.getsource(method).splitlines()
    start = next(i for i, line in enumerate(lines) if first_line in line)
    stop = next(i for i, line in enumerate(lines) if i > start and last_line in line)
    return textwrap.dedent("\n".join(lines[start:stop + 1]))


def trl_grpo_advantages(rewards_per_func, num_generations, reward_weights, scale_rewards, aggregation):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions's advantage block (grpo_trainer.py ~2756-2808)."""
    from trl import GRPOTrainer
    from trl.trainer.utils import nanstd

    block = trl_block(GRPOTrainer._generate_and_score_completions, "unscorable_mask = torch.isnan(rewards_per_func)",
                      "advantages = torch.nan_to_num(advantages, nan=0.0)")
    stand_in = types.SimpleNamespace(reward_weights=reward_weights, scale_rewards=scale_rewards,
                                     multi_objective_aggregation=aggregation,
                                     reward_funcs=[None] * rewards_per_func.size(1))
    scope = dict(torch=torch, nanstd=nanstd, self=stand_in, device="cpu", num_generations=num_generations,
                 rewards_per_func=rewards_per_func.clone())
    exec(block, scope)
    return scope["advantages"], scope["is_std_zero"]


def trl_rloo_advantages(rewards_per_func, num_generations, reward_weights, beta, normalize, old, ref, mask):
    """TRL 1.16 RLOOTrainer._generate_and_score_completions's advantage block (rloo_trainer.py ~1650-1696)."""
    from trl import RLOOTrainer
    from trl.trainer.utils import nanstd

    block = trl_block(RLOOTrainer._generate_and_score_completions, "unscorable_mask = torch.isnan(rewards_per_func)",
                      "is_std_zero = torch.isclose(std_rewards")
    stand_in = types.SimpleNamespace(reward_weights=reward_weights, reward_clip_range=None, beta=beta,
                                     normalize_advantages=normalize)
    scope = dict(torch=torch, nanstd=nanstd, gather=_identity, self=stand_in, device="cpu",
                 num_generations=num_generations, rewards_per_func=rewards_per_func.clone(),
                 old_per_token_logps=old, ref_per_token_logps=ref, completion_mask=mask)
    exec(block, scope)
    return scope["advantages"], scope["is_std_zero"].repeat_interleave(num_generations)


def _rewards_batch(num_groups=5, num_generations=4, num_funcs=2, seed=0):
    """Rewards of a few shapes: continuous, binary (ties, zero-std groups), None entries and unscorable rows."""
    g = torch.Generator().manual_seed(seed)
    n = num_groups * num_generations
    r = torch.randn(n, num_funcs, generator=g)
    r[:, 0] = (torch.rand(n, generator=g) < 0.5).float()  # a 0/1 verifier reward
    r[0:num_generations, 0] = 1.0  # a group where the verifier ties
    r[torch.rand(n, num_funcs, generator=g) < 0.15] = NAN  # some None rewards
    r[1] = NAN  # an unscorable row
    r[2 * num_generations:2 * num_generations + num_generations - 1] = NAN  # a group with one scorable row
    r[3 * num_generations:4 * num_generations] = NAN  # an unscorable group
    if num_funcs > 1:
        r[4 * num_generations:, 1] = NAN  # a group scored only by the first reward
    return r


ADVANTAGE_CASES = [(scale, "sum_then_normalize") for scale in SCALE_REWARDS] + [("group", "normalize_then_sum")]


def grpo_advantages_parity(scale_rewards, aggregation, num_funcs, num_generations=4):
    r = _rewards_batch(num_generations=num_generations, num_funcs=num_funcs)
    weights = torch.tensor([1.0, 0.5, 2.0][:num_funcs])
    theirs, theirs_zero = trl_grpo_advantages(r, num_generations, weights, scale_rewards, aggregation)
    mine = grpo_advantages(r, num_generations, weights, scale_rewards=scale_rewards, aggregation=aggregation)
    assert torch.equal(mine.std_is_zero, theirs_zero)
    assert not torch.isnan(mine.advantages).any()
    return (mine.advantages - theirs).abs().max().item()


@pytest.mark.parametrize("scale_rewards, aggregation", ADVANTAGE_CASES)
@pytest.mark.parametrize("num_funcs", [1, 2, 3])
def test_grpo_advantages_equal_trl(scale_rewards, aggregation, num_funcs):
    assert grpo_advantages_parity(scale_rewards, aggregation, num_funcs) <= 1e-6


def test_grpo_advantages_g2_equal_trl():
    for scale, aggregation in ADVANTAGE_CASES:
        assert grpo_advantages_parity(scale, aggregation, 2, num_generations=2) <= 1e-6


def rloo_advantages_parity(beta, normalize, num_funcs=2, num_generations=4):
    r = _rewards_batch(num_generations=num_generations, num_funcs=num_funcs, seed=1)
    weights = torch.tensor([1.0, 0.5, 2.0][:num_funcs])
    logps, old, ref, _, _ = _policy_batch(torch.float32, seed=2, batch_size=r.size(0), length=5)
    mask = (torch.rand(r.size(0), 5, generator=torch.Generator().manual_seed(4)) < 0.8).long()
    theirs, theirs_zero = trl_rloo_advantages(r, num_generations, weights, beta, normalize, old, ref, mask)
    kl = ((old - ref) * mask).sum(-1)
    mine = rloo_advantages(r, num_generations, weights, kl=kl, beta=beta, normalize=normalize)
    assert torch.equal(mine.std_is_zero, theirs_zero)
    return (mine.advantages - theirs).abs().max().item()


@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("num_funcs", [1, 2])
def test_rloo_advantages_equal_trl(beta, normalize, num_funcs):
    assert rloo_advantages_parity(beta, normalize, num_funcs) <= 1e-6


def test_logged_rewards_match_trl():
    """``rewards`` is what TRL logs as ``reward``: the weighted sum, NaN where unscorable (grpo_trainer.py ~2824)."""
    r = _rewards_batch()
    weights = torch.tensor([1.0, 0.5])
    expected = (r * weights).nansum(dim=1)
    expected[torch.isnan(r).all(dim=1)] = NAN
    for out in (grpo_advantages(r, 4, weights), rloo_advantages(r, 4, weights)):
        torch.testing.assert_close(out.rewards, expected, equal_nan=True)
