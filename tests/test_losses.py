"""Tests for prefmodule.objectives.losses: hand-computed values, analytic gradients, ORPO stability, TRL parity."""

from __future__ import annotations

import math
import types
from collections import defaultdict

import pytest
import torch

from prefmodule.objectives.losses import (
    DPO_LOSS_TYPES,
    DPO_LOSSES,
    dpo_loss,
    log1mexp,
    nll_loss,
    orpo_loss,
    register_dpo_loss,
    simpo_loss,
)

ALL_TYPES = (
    "sigmoid", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard",
    "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sigmoid_norm",
)  # fmt: skip


def logsig(z: float) -> float:
    """log sigmoid(z) in plain Python."""
    return -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


# --------------------------------------------------------------------------------------------
# Hand-computed values
# --------------------------------------------------------------------------------------------

# Three pairs: (policy_w, policy_l, ref_w, ref_l, len_w, len_l).
# Log-ratios: pair 0: chosen +1.0, rejected -0.5 (delta +1.5); pair 1: chosen -1.0, rejected +1.5
# (delta -2.5); pair 2: all zero (delta 0; len_w 0 is clamped to 1).
PAIRS = [(-5.0, -7.0, -6.0, -6.5, 4, 2), (-10.0, -8.0, -9.0, -9.5, 10, 5), (-3.0, -3.0, -3.0, -3.0, 0, 3)]
BETA, EPS, TAU = 0.5, 0.1, 0.05


def _pair_tensors(dtype=torch.float32):
    cols = list(zip(*PAIRS))
    pw, pl, rw, rl = (torch.tensor(c, dtype=dtype) for c in cols[:4])
    return pw, pl, rw, rl, torch.tensor(cols[4]), torch.tensor(cols[5])


def _logratios(pair):
    pw, pl, rw, rl, nw, nl = pair
    return pw - rw, pl - rl, max(nw, 1), max(nl, 1)


def _expected_per_pair(loss_type: str, pair) -> float:
    """Each loss written out from its paper / TRL's formula, in scalar Python arithmetic."""
    cw, cl, nw, nl = _logratios(pair)
    z = BETA * (cw - cl)
    if loss_type == "sigmoid":  # cDPO with eps
        return -(1 - EPS) * logsig(z) - EPS * logsig(-z)
    if loss_type == "robust":
        return (-(1 - EPS) * logsig(z) + EPS * logsig(-z)) / (1 - 2 * EPS)
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    if loss_type == "ipo":
        return (cw / nw - cl / nl - 1 / (2 * BETA)) ** 2
    if loss_type == "exo_pair":
        qw, ql = sig(z), sig(-z)
        return qw * math.log(qw / (1 - EPS)) + ql * math.log(ql / EPS)
    if loss_type == "nca_pair":
        return -logsig(BETA * cw) - 0.5 * logsig(-BETA * cw) - 0.5 * logsig(-BETA * cl)
    if loss_type == "bco_pair":
        return -logsig(BETA * cw) - logsig(-BETA * cl)
    if loss_type == "sppo_hard":
        return (cw - 1 / (2 * BETA)) ** 2 + (cl + 1 / (2 * BETA)) ** 2
    if loss_type == "apo_zero":
        return (1 - sig(BETA * cw)) + sig(BETA * cl)
    if loss_type == "apo_down":
        return sig(BETA * cw) + 1 - sig(z)
    if loss_type == "discopop":
        m = sig(z / TAU)
        return (1 - m) * -logsig(z) + m * math.exp(-z)
    if loss_type == "sigmoid_norm":
        return -logsig(BETA * (cw / nw - cl / nl))
    raise AssertionError(loss_type)


def _expected_aot(paired: bool) -> list[float]:
    if paired:
        policy = sorted(pw - pl for pw, pl, *_ in PAIRS)
        ref = sorted(rw - rl for _, _, rw, rl, *_ in PAIRS)
    else:
        policy = sorted(_logratios(p)[0] for p in PAIRS)
        ref = sorted(_logratios(p)[1] for p in PAIRS)
    return [-(1 - EPS) * logsig(BETA * (x - y)) - EPS * logsig(-BETA * (x - y)) for x, y in zip(policy, ref)]


def _ours(loss_type, dtype=torch.float32, **kw):
    pw, pl, rw, rl, nw, nl = _pair_tensors(dtype)
    kw = {"beta": BETA, "label_smoothing": EPS, "discopop_tau": TAU, **kw}
    return dpo_loss(pw, pl, rw, rl, loss_type=loss_type, chosen_lengths=nw, rejected_lengths=nl, **kw)


def test_registry_holds_every_loss_type():
    assert set(DPO_LOSS_TYPES) == set(ALL_TYPES)
    assert set(DPO_LOSSES) >= set(ALL_TYPES)
    assert all(callable(fn) for fn in DPO_LOSSES.values())


@pytest.mark.parametrize("loss_type", [t for t in ALL_TYPES if not t.startswith("aot")])
def test_dpo_loss_matches_hand_computation(loss_type):
    losses, _, _ = _ours(loss_type, dtype=torch.float64)
    expected = [_expected_per_pair(loss_type, p) for p in PAIRS]
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_matches_hand_computation(loss_type):
    losses, _, _ = _ours(loss_type, dtype=torch.float64)
    expected = _expected_aot(paired=loss_type == "aot")
    torch.testing.assert_close(losses, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_literal_values():
    """A few numbers worked out on paper (beta = 0.5)."""
    sig0 = _ours("sigmoid", label_smoothing=0.0)[0]
    expected = [math.log1p(math.exp(-0.75)), math.log1p(math.exp(1.25)), math.log(2)]
    torch.testing.assert_close(sig0, torch.tensor(expected))
    torch.testing.assert_close(_ours("hinge")[0], torch.tensor([0.25, 2.25, 1.0]))
    # ipo: (1/4 + 0.5/2 - 1)^2, (-1/10 - 1.5/5 - 1)^2, (0 - 0 - 1)^2
    torch.testing.assert_close(_ours("ipo")[0], torch.tensor([0.25, 1.96, 1.0]))
    torch.testing.assert_close(_ours("sppo_hard")[0], torch.tensor([0.25, 10.25, 2.0]))
    # apo_zero at zero log-ratios: (1 - 1/2) + 1/2
    assert _ours("apo_zero")[0][2].item() == pytest.approx(1.0)


def test_sigmoid_without_smoothing_is_standard_dpo_and_robust_reduces_to_it():
    plain = _ours("sigmoid", label_smoothing=0.0)[0]
    robust = _ours("robust", label_smoothing=0.0)[0]
    expected = torch.tensor([-logsig(BETA * (_logratios(p)[0] - _logratios(p)[1])) for p in PAIRS])
    torch.testing.assert_close(plain, expected)
    torch.testing.assert_close(robust, expected)
    assert not torch.allclose(_ours("sigmoid", label_smoothing=0.2)[0], plain)


def test_rewards_are_beta_times_logratios_and_detached():
    pw, pl, rw, rl, _, _ = _pair_tensors()
    pw.requires_grad_(True)
    pl.requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(pw, pl, rw, rl, beta=BETA)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.5, -0.5, 0.0]))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-0.25, 0.75, 0.0]))
    assert losses.requires_grad
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_weighted_combination_of_loss_types():
    losses, _, _ = _ours(["sigmoid", "hinge", "ipo"], loss_weights=[1.0, 0.5, 2.0])
    expected = [
        _expected_per_pair("sigmoid", p) + 0.5 * _expected_per_pair("hinge", p) + 2.0 * _expected_per_pair("ipo", p)
        for p in PAIRS
    ]
    torch.testing.assert_close(losses, torch.tensor(expected))
    default_weights, _, _ = _ours(["sigmoid", "hinge"])
    torch.testing.assert_close(default_weights, _ours("sigmoid")[0] + _ours("hinge")[0])


def test_low_precision_inputs_are_upcast():
    bf16 = _ours("sigmoid", dtype=torch.bfloat16)
    assert all(t.dtype == torch.float32 for t in bf16)
    assert _ours("sigmoid", dtype=torch.float64)[0].dtype == torch.float64
    a, b = torch.tensor([-0.5], dtype=torch.bfloat16), torch.tensor([-1.0], dtype=torch.bfloat16)
    assert orpo_loss(a, b)[0].dtype == torch.float32
    assert simpo_loss(a, b)[0].dtype == torch.float32


def test_discopop_stays_finite_for_very_negative_margins():
    pw, pl = torch.tensor([-2000.0], requires_grad=True), torch.tensor([-10.0])
    losses, _, _ = dpo_loss(pw, pl, torch.tensor([-10.0]), torch.tensor([-10.0]), beta=0.1, loss_type="discopop")
    losses.sum().backward()
    # z = -199: the logistic term dominates, -log sigmoid(-199) = 199 (+ ~e^-199)
    assert losses.item() == pytest.approx(199.0)
    assert torch.isfinite(pw.grad).all()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"loss_type": "nope"}, "valid names"),
        ({"loss_type": ["sigmoid", "nope"]}, "sigmoid"),
        ({"loss_type": "ipo"}, "chosen_lengths"),
        ({"loss_type": "sigmoid_norm"}, "chosen_lengths"),
        ({"loss_type": "exo_pair", "label_smoothing": 0.0}, "label_smoothing"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, "label_smoothing"),
        ({"loss_type": ["sigmoid", "hinge"], "loss_weights": [1.0]}, "loss_weights"),
        ({"loss_type": []}, "at least one"),
    ],
)
def test_invalid_arguments_raise_clear_errors(kwargs, message):
    pw, pl, rw, rl, _, _ = _pair_tensors()
    with pytest.raises(ValueError, match=message):
        dpo_loss(pw, pl, rw, rl, **kwargs)


def test_unknown_loss_type_error_lists_every_name():
    pw, pl, rw, rl, _, _ = _pair_tensors()
    with pytest.raises(ValueError) as err:
        dpo_loss(pw, pl, rw, rl, loss_type="sigmod")
    assert all(name in str(err.value) for name in ALL_TYPES)


def test_mismatched_shapes_raise():
    with pytest.raises(ValueError, match="same shape"):
        dpo_loss(torch.zeros(3), torch.zeros(3), torch.zeros(2), torch.zeros(3))


def test_register_custom_loss_type():
    @register_dpo_loss("_test_margin")
    def _margin(pairs, *, beta, **_):
        return -beta * pairs.delta

    try:
        losses, _, _ = _ours("_test_margin")
        torch.testing.assert_close(losses, torch.tensor([-0.75, 1.25, 0.0]))
        with pytest.raises(ValueError, match="already registered"):
            register_dpo_loss("_test_margin")(_margin)
    finally:
        del DPO_LOSSES["_test_margin"]


# --------------------------------------------------------------------------------------------
# Gradients
# --------------------------------------------------------------------------------------------


def test_sigmoid_dpo_gradient_matches_spec():
    """DPO (Rafailov et al., 2023): dL/dlogp_w = -beta * sigmoid(r_l - r_w), dL/dlogp_l = +beta * sigmoid(r_l - r_w)."""
    beta = 0.1
    pw = torch.tensor([-12.0, -30.0, -7.5, -50.0], requires_grad=True)
    pl = torch.tensor([-15.0, -20.0, -7.5, -80.0], requires_grad=True)
    rw = torch.tensor([-13.0, -28.0, -8.0, -49.0])
    rl = torch.tensor([-14.0, -22.0, -7.0, -70.0])
    losses, _, _ = dpo_loss(pw, pl, rw, rl, beta=beta)
    losses.sum().backward()
    r_w = [beta * (a - b) for a, b in zip(pw.tolist(), rw.tolist())]
    r_l = [beta * (a - b) for a, b in zip(pl.tolist(), rl.tolist())]
    weight = [sig(l - w) for w, l in zip(r_w, r_l)]
    torch.testing.assert_close(pw.grad, torch.tensor([-beta * s for s in weight]))
    torch.testing.assert_close(pl.grad, torch.tensor([beta * s for s in weight]))


def test_orpo_gradient_matches_analytic():
    """ORPO (Hong et al., 2024) with loss = -beta * log sigmoid(log_odds) (the quantity we minimise):

    delta = sigmoid(-log_odds) = 1 / (1 + odds_w / odds_l),
    dL/da = -beta * delta / (1 - P_w),  dL/db = +beta * delta / (1 - P_l).
    The paper writes grad L_OR = delta * h(d) with h = grad a / (1 - P_w) - grad b / (1 - P_l); that is the
    ascent direction of log sigmoid(log_odds), i.e. minus the gradient of the loss, hence the signs.
    """
    beta = 0.25
    a_vals, b_vals = [-0.05, -0.7, -2.0, -1e-4, -6.0], [-0.9, -0.1, -2.5, -3.0, -1e-3]
    a = torch.tensor(a_vals, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(b_vals, dtype=torch.float64, requires_grad=True)
    losses, log_odds = orpo_loss(a, b, beta=beta)
    losses.sum().backward()
    exp_da, exp_db, exp_log_odds = [], [], []
    for x, y in zip(a_vals, b_vals):
        p_w, p_l = math.exp(x), math.exp(y)
        odds_w, odds_l = p_w / (1 - p_w), p_l / (1 - p_l)
        delta = 1 / (1 + odds_w / odds_l)
        exp_da.append(-beta * delta / (1 - p_w))
        exp_db.append(beta * delta / (1 - p_l))
        exp_log_odds.append(math.log(odds_w / odds_l))
    torch.testing.assert_close(log_odds, torch.tensor(exp_log_odds, dtype=torch.float64))
    torch.testing.assert_close(a.grad, torch.tensor(exp_da, dtype=torch.float64))
    torch.testing.assert_close(b.grad, torch.tensor(exp_db, dtype=torch.float64))


def test_orpo_hand_values():
    # P_w = 0.5, P_l = 0.25: odds 1 and 1/3, log_odds = log 3, loss = -0.1 * log(3/4)
    a, b = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    losses, log_odds = orpo_loss(a, b, beta=0.1)
    assert log_odds.item() == pytest.approx(math.log(3.0), rel=1e-6)
    assert losses.item() == pytest.approx(-0.1 * math.log(0.75), rel=1e-6)


def _rand_logps(n, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def test_orpo_gradcheck_float64():
    a = _rand_logps(6, -4.0, -0.01, 0).requires_grad_(True)
    b = _rand_logps(6, -4.0, -0.01, 1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, y: orpo_loss(x, y, beta=0.3), (a, b))


@pytest.mark.parametrize(
    "loss_type",
    ["sigmoid", "robust", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
     "apo_zero", "apo_down", "discopop", "sigmoid_norm", ("sigmoid", "ipo")],
)  # fmt: skip
def test_dpo_gradcheck_float64(loss_type):
    pw, pl, rw, rl = (_rand_logps(5, -40.0, -5.0, s) for s in range(4))
    lengths_w, lengths_l = torch.tensor([3, 7, 1, 12, 5]), torch.tensor([4, 2, 9, 6, 1])
    pw.requires_grad_(True)
    pl.requires_grad_(True)

    names = list(loss_type) if isinstance(loss_type, tuple) else loss_type

    def fn(x, y):
        return dpo_loss(x, y, rw, rl, beta=0.1, loss_type=names, label_smoothing=0.1,
                        chosen_lengths=lengths_w, rejected_lengths=lengths_l)[0]  # fmt: skip

    assert torch.autograd.gradcheck(fn, (pw, pl))


def test_simpo_values_and_gradcheck():
    a, b = torch.tensor([-0.5, -1.2], dtype=torch.float64), torch.tensor([-0.9, -0.8], dtype=torch.float64)
    losses, chosen_rewards, rejected_rewards = simpo_loss(a, b, beta=2.0, gamma=0.5)
    # z = 2*(-0.5) - 2*(-0.9) - 0.5 = 0.3 ; z = 2*(-1.2) - 2*(-0.8) - 0.5 = -1.3
    torch.testing.assert_close(losses, torch.tensor([-logsig(0.3), -logsig(-1.3)], dtype=torch.float64))
    torch.testing.assert_close(chosen_rewards, torch.tensor([-1.0, -2.4], dtype=torch.float64))
    torch.testing.assert_close(rejected_rewards, torch.tensor([-1.8, -1.6], dtype=torch.float64))
    smoothed = simpo_loss(a, b, beta=2.0, gamma=0.5, label_smoothing=0.2)[0]
    torch.testing.assert_close(smoothed[0].item(), -0.8 * logsig(0.3) - 0.2 * logsig(-0.3))
    assert torch.autograd.gradcheck(
        lambda x, y: simpo_loss(x, y, beta=2.5, gamma=1.0, label_smoothing=0.1)[0],
        (a.clone().requires_grad_(True), b.clone().requires_grad_(True)),
    )


# --------------------------------------------------------------------------------------------
# ORPO numerical stability
# --------------------------------------------------------------------------------------------


def test_log1mexp_matches_math_and_has_finite_gradients():
    xs = [-1e-9, -1e-6, -0.01, -0.5, -math.log(2), -0.7, -1.0, -5.0, -30.0, -100.0]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    torch.testing.assert_close(y, torch.tensor([math.log(-math.expm1(v)) for v in xs], dtype=torch.float64))
    y.sum().backward()  # d/dx log(1 - e^x) = -1 / (e^-x - 1) = 1 / expm1(x) * e^x
    torch.testing.assert_close(x.grad, torch.tensor([math.exp(v) / math.expm1(v) for v in xs], dtype=torch.float64))
    x32 = torch.tensor(xs, requires_grad=True)
    log1mexp(x32).sum().backward()
    assert torch.isfinite(x32.grad).all()  # TRL's log1mexp gives nan at -1e-9 in float32
    assert log1mexp(torch.tensor([0.0])).item() == -math.inf


def _grid():
    values = torch.cat([-torch.logspace(-9, 2, 80, dtype=torch.float64), torch.tensor([-1e-9, -100.0, -math.log(2)])])
    a, b = torch.meshgrid(values, values, indexing="ij")
    return a.flatten(), b.flatten()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_orpo_finite_on_dense_grid(dtype):
    a64, b64 = _grid()
    a = a64.to(dtype).requires_grad_(True)
    b = b64.to(dtype).requires_grad_(True)
    losses, log_odds = orpo_loss(a, b, beta=0.1)
    losses.sum().backward()
    for t in (losses, log_odds, a.grad, b.grad):
        assert torch.isfinite(t).all()
    # and accurate: compare with float64 math on the (rounded) inputs actually used
    a_in, b_in = a.detach().double(), b.detach().double()
    reference = [
        (x - y) - (math.log(-math.expm1(x)) - math.log(-math.expm1(y))) for x, y in zip(a_in.tolist(), b_in.tolist())
    ]
    torch.testing.assert_close(log_odds.double(), torch.tensor(reference, dtype=torch.float64), rtol=1e-5, atol=1e-4)
    assert (losses >= 0).all()


def test_orpo_at_exactly_zero_is_finite():
    a = torch.tensor([0.0, 0.0, -0.3, -1e-9], requires_grad=True)
    b = torch.tensor([0.0, -0.3, 0.0, 0.0], requires_grad=True)
    losses, log_odds = orpo_loss(a, b)
    losses.sum().backward()
    for t in (losses, log_odds, a.grad, b.grad):
        assert torch.isfinite(t).all()
    assert log_odds[0].item() == 0.0
    # a = 0 acts as -1e-12: log(1 - e^a) = log(1e-12)
    expected = (0.0 + 0.3) - (math.log(1e-12) - math.log(-math.expm1(-0.3)))
    assert log_odds[1].item() == pytest.approx(expected, rel=1e-5)


# --------------------------------------------------------------------------------------------
# NLL
# --------------------------------------------------------------------------------------------


def test_nll_loss_is_token_mean_over_all_response_tokens():
    # two sequences: tokens (-1, -2) and (-4, -5)
    logps = torch.tensor([-3.0, -9.0], requires_grad=True)
    lengths = torch.tensor([2, 2])
    loss = nll_loss(logps, lengths)
    assert loss.item() == pytest.approx((1 + 2 + 4 + 5) / 4)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([-0.25, -0.25]))
    assert nll_loss(torch.zeros(2), torch.zeros(2, dtype=torch.long)).item() == 0.0
    assert nll_loss(logps.detach().to(torch.bfloat16), lengths).dtype == torch.float32


# --------------------------------------------------------------------------------------------
# Parity with TRL 1.16's own code
# --------------------------------------------------------------------------------------------


class _FakePolicy:
    """Stands in for the model in TRL's DPOTrainer._compute_loss: returns fixed per-token log-probs."""

    training = True

    def __init__(self, per_token_logps, log_sum_sq_probs=None):
        self.per_token_logps = per_token_logps
        self.log_sum_sq_probs = log_sum_sq_probs

    def __call__(self, **kwargs):
        zeros = torch.zeros_like(self.per_token_logps.detach())
        return types.SimpleNamespace(
            log_probs=self.per_token_logps, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
            log_sum_sq_probs=self.log_sum_sq_probs,
        )


def _trl_dpo_loss(per_token_logps, completion_mask, ref_w, ref_l, *, loss_types, loss_weights, beta, eps, tau,
                  log_sum_sq_probs=None, **options):
    """Runs TRL's real DPOTrainer._compute_loss with a stand-in `self` and returns its (batch-mean) loss.

    ``options`` set TRL's ``ld_alpha``, ``f_divergence_type``, ``f_alpha_divergence_coef``, ``use_weighting``."""
    from trl import DPOTrainer

    model = _FakePolicy(per_token_logps, log_sum_sq_probs)
    identity = lambda x: x  # noqa: E731
    trainer = types.SimpleNamespace(
        model=model,
        accelerator=types.SimpleNamespace(device=torch.device("cpu"), gather=identity, gather_for_metrics=identity),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=0.5,
        loss_types=list(loss_types),
        loss_weights=list(loss_weights),
        beta=beta,
        label_smoothing=eps,
        use_weighting=False,
        args=types.SimpleNamespace(discopop_tau=tau),
        _metrics=defaultdict(lambda: defaultdict(list)),
        _total_train_tokens=0,
        _tp_size=1,
    )
    vars(trainer).update(options)
    n, t = completion_mask.shape
    inputs = {
        "input_ids": torch.zeros(n, t, dtype=torch.long),
        "attention_mask": torch.ones(n, t, dtype=torch.long),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref_w,
        "ref_rejected_logps": ref_l,
    }
    loss = DPOTrainer._compute_loss(trainer, model, inputs, return_outputs=False)
    assert trainer._metrics["train"]["rewards/chosen"], "TRL's code path did not run to the end"
    return loss


def _random_batch(batch_size, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    logps = [-(1.0 + 60.0 * torch.rand(batch_size, generator=g, dtype=torch.float64)).to(dtype) for _ in range(4)]
    lengths = torch.randint(1, 12, (2, batch_size), generator=g)
    return logps, lengths[0], lengths[1]


def _completion_mask(chosen_lengths, rejected_lengths):
    """[2B, T] mask: one prompt token, then `length` completion tokens, then padding; batch is [chosen, rejected]."""
    lengths = torch.cat([chosen_lengths, rejected_lengths])
    t = int(lengths.max()) + 2
    positions = torch.arange(t)
    return ((positions >= 1) & (positions <= lengths[:, None])).long()


PARITY_CASES = [(t, 0.0) for t in ALL_TYPES] + [
    ("robust", 0.2), ("exo_pair", 1e-3), ("exo_pair", 0.2), ("aot", 0.15), ("aot_unpaired", 0.15),
]  # fmt: skip
PARITY_CASES.remove(("exo_pair", 0.0))  # exo_pair needs eps > 0 (TRL raises too)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("loss_type, eps", PARITY_CASES)
def test_dpo_parity_with_trl_compute_loss(loss_type, eps, dtype):
    pytest.importorskip("trl")
    batch_size, beta, tau = 8, 0.1, 0.05
    (pw, pl, rw, rl), len_w, len_l = _random_batch(batch_size, seed=ALL_TYPES.index(loss_type), dtype=dtype)
    mask = _completion_mask(len_w, len_l)

    # Each sequence's whole log-prob sits on its first completion token, so TRL's token sums equal pw / pl.
    seq_logps = torch.cat([pw, pl]).requires_grad_(True)
    per_token = torch.cat([seq_logps[:, None], torch.zeros(2 * batch_size, mask.size(1) - 2, dtype=dtype)], dim=1)
    trl_loss = _trl_dpo_loss(
        per_token, mask, rw, rl, loss_types=[loss_type], loss_weights=[1.0], beta=beta, eps=eps, tau=tau
    )
    (trl_grad,) = torch.autograd.grad(trl_loss, seq_logps)

    ours_w, ours_l = pw.clone().requires_grad_(True), pl.clone().requires_grad_(True)
    losses, _, _ = dpo_loss(ours_w, ours_l, rw, rl, beta=beta, loss_type=loss_type, label_smoothing=eps,
                            chosen_lengths=len_w, rejected_lengths=len_l, discopop_tau=tau)  # fmt: skip
    ours_loss = losses.mean()
    ours_loss.backward()

    # TRL builds exo_pair's epsilon as a float32 tensor, so its float64 result is only float32-accurate there.
    tight = dtype == torch.float64 and loss_type != "exo_pair"
    tol = {"rtol": 1e-10, "atol": 1e-10} if tight else {"rtol": 1e-6, "atol": 1e-6}
    torch.testing.assert_close(ours_loss, trl_loss.to(ours_loss.dtype), **tol)
    torch.testing.assert_close(torch.cat([ours_w.grad, ours_l.grad]), trl_grad.to(ours_w.grad.dtype), **tol)


def test_dpo_parity_with_trl_weighted_combination_and_sft():
    """Several loss types with weights, plus TRL's `sft` term == our nll_loss on the chosen tokens."""
    pytest.importorskip("trl")
    batch_size, beta = 6, 0.2
    (pw, pl, rw, rl), len_w, len_l = _random_batch(batch_size, seed=7, dtype=torch.float64)
    mask = _completion_mask(len_w, len_l)
    shift_mask = mask[:, 1:]
    g = torch.Generator().manual_seed(3)
    per_token = -3.0 * torch.rand(shift_mask.shape, generator=g, dtype=torch.float64) * shift_mask
    seq_logps = per_token.sum(dim=1)

    types_, weights = ["sigmoid", "bco_pair", "sft", "ipo"], [1.0, 0.3, 0.7, 0.05]
    trl_loss = _trl_dpo_loss(
        per_token, mask, rw, rl, loss_types=types_, loss_weights=weights, beta=beta, eps=0.0, tau=0.05
    )
    losses, _, _ = dpo_loss(seq_logps[:batch_size], seq_logps[batch_size:], rw, rl, beta=beta,
                            loss_type=["sigmoid", "bco_pair", "ipo"], loss_weights=[1.0, 0.3, 0.05],
                            chosen_lengths=len_w, rejected_lengths=len_l)  # fmt: skip
    ours = losses.mean() + 0.7 * nll_loss(seq_logps[:batch_size], shift_mask[:batch_size].sum(1))
    torch.testing.assert_close(ours, trl_loss, rtol=1e-10, atol=1e-10)


def test_orpo_parity_with_trl():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    beta = 0.25
    a = _rand_logps(64, -6.0, -1e-3, 11).float()
    b = _rand_logps(64, -6.0, -1e-3, 12).float()
    stand_in = types.SimpleNamespace(beta=beta, accelerator=types.SimpleNamespace(device="cpu"))
    trl_losses, trl_chosen_r, trl_rejected_r, trl_log_sig, trl_log_odds = ORPOTrainer.odds_ratio_loss(stand_in, a, b)
    losses, log_odds = orpo_loss(a, b, beta=beta)
    # TRL returns +beta * log sigmoid(log_odds) and its trainer subtracts it; ours is the loss itself.
    torch.testing.assert_close(losses, -trl_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(log_odds.mean(), trl_log_odds, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(torch.nn.functional.logsigmoid(log_odds).mean(), trl_log_sig, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(beta * a, trl_chosen_r)


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_parity_with_trl_cpo(eps):
    pytest.importorskip("trl")
    from trl.experimental.cpo import CPOTrainer

    beta, gamma = 2.0, 0.8
    a = _rand_logps(32, -3.0, -0.05, 21).float()
    b = _rand_logps(32, -3.0, -0.05, 22).float()
    stand_in = types.SimpleNamespace(
        alpha=0.0, loss_type="simpo", simpo_gamma=gamma, beta=beta, label_smoothing=eps,
        accelerator=types.SimpleNamespace(device="cpu"),
    )  # fmt: skip
    trl_losses, trl_chosen_r, trl_rejected_r = CPOTrainer.cpo_loss(stand_in, a, b)
    losses, chosen_r, rejected_r = simpo_loss(a, b, beta=beta, gamma=gamma, label_smoothing=eps)
    torch.testing.assert_close(losses, trl_losses, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(chosen_r, trl_chosen_r)
    torch.testing.assert_close(rejected_r, trl_rejected_r)
