"""DPO's options: f-divergences, WPO and LD-DPO against TRL 1.16's own DPOTrainer code; DPO-Positive and
beta-DPO against their papers; the per-token log-prob sums they need, equal on every log-prob path; and a
few training steps with each."""

import math
from pathlib import Path

import lightning as L
import pytest
import torch

from prefmodule import DPOModule, PreferenceDataModule
from prefmodule.cli import main
from prefmodule.models.logps import SequenceStats, per_sequence
from prefmodule.objectives.losses import (
    SCORE_LOSS_TYPES, beta_dpo_beta, beta_dpo_filter, beta_dpo_running_stats, dpo_loss, f_divergence_score, ld_logps,
    wpo_weights,
)

from conftest import TINY_MODEL, full_and_chunked_modules
from test_losses import _completion_mask, _trl_dpo_loss, logsig
from test_logps import a_batch, packed

pytest.importorskip("trl")
CONFIGS = Path(__file__).parent.parent / "configs"


def random_pairs(batch_size, seed, dtype=torch.float64, spread=3.0):
    """Per-token log-probs ``[2B, T - 1]`` (zero outside the completion), the completion mask ``[2B, T]`` and
    reference log-probs whose log-ratios lie within ``spread``."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 9, (2, batch_size), generator=g)
    mask = _completion_mask(lengths[0], lengths[1])
    per_token = -2.0 * torch.rand(mask[:, 1:].shape, generator=g, dtype=torch.float64) * mask[:, 1:]
    ref = per_token.sum(1) + spread * (2 * torch.rand(2 * batch_size, generator=g, dtype=torch.float64) - 1)
    return per_token.to(dtype), mask, ref.to(dtype), lengths[0], lengths[1]


def trl_loss_and_grad(per_token, mask, ref, loss_type, beta=0.1, **options):
    per_token = per_token.clone().requires_grad_(True)
    batch = ref.numel() // 2
    loss = _trl_dpo_loss(per_token, mask, ref[:batch], ref[batch:], loss_types=[loss_type], loss_weights=[1.0],
                         beta=beta, eps=0.1 if loss_type in ("exo_pair", "robust") else 0.0, tau=0.05, **options)
    (grad,) = torch.autograd.grad(loss, per_token)
    return loss, grad


def token_stats(per_token, mask):
    """Our ``SequenceStats`` of per-token log-probs ``[rows, T - 1]`` under the shifted completion mask, with
    its ``token_logps`` a leaf that requires grad."""
    keep = mask[:, 1:].bool()
    tokens = per_token.detach()[keep].requires_grad_(True)
    return per_sequence(tokens, torch.zeros_like(tokens), keep.nonzero()[:, 0], len(per_token))


# ----- f-divergences ------------------------------------------------------------------------------------
@pytest.mark.parametrize("f_divergence, coef", [
    ("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5), ("alpha_divergence", 0.3),
    ("alpha_divergence", 1.0),
])
@pytest.mark.parametrize("loss_type", sorted(SCORE_LOSS_TYPES))
def test_f_divergence_equals_trl(loss_type, f_divergence, coef):
    per_token, mask, ref, len_w, len_l = random_pairs(8, seed=len(loss_type), dtype=torch.float32)
    expected, expected_grad = trl_loss_and_grad(per_token, mask, ref, loss_type, f_divergence_type=f_divergence,
                                                f_alpha_divergence_coef=coef)
    stats = token_stats(per_token, mask)
    logps = stats.logps
    losses, _, _ = dpo_loss(logps[:8], logps[8:], ref[:8], ref[8:], beta=0.1, loss_type=loss_type,
                            label_smoothing=0.1 if loss_type in ("exo_pair", "robust") else 0.0,
                            chosen_lengths=len_w, rejected_lengths=len_l, f_divergence_type=f_divergence,
                            f_alpha_divergence_coef=coef)
    (grad,) = torch.autograd.grad(losses.mean(), stats.token_logps)
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, expected_grad[mask[:, 1:].bool()], rtol=1e-4, atol=1e-6)


def test_f_divergence_scores_by_hand():
    u = torch.tensor([0.5, 2.0], dtype=torch.float64)
    log_u = u.log()
    torch.testing.assert_close(f_divergence_score(log_u, "reverse_kl"), log_u)
    torch.testing.assert_close(f_divergence_score(log_u, "forward_kl"), torch.tensor([-1.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(f_divergence_score(log_u, "js_divergence"), (2 * u / (1 + u)).log())
    # alpha = 0.5: (u^-0.5 - 1) / -0.5
    torch.testing.assert_close(f_divergence_score(log_u, "alpha_divergence", 0.5), (u**-0.5 - 1) / -0.5)
    # Wang et al. (2023, Table 1) write the alpha-divergence's f'(u) = (1 - u^-a) / a: TRL's and ours at alpha = 1 - a
    for a in (0.3, 0.5, 0.7):
        torch.testing.assert_close(f_divergence_score(log_u, "alpha_divergence", 1 - a), (1 - u**-a) / a)
    # and its limits: a -> 0 is reverse KL (log u), a -> 1 forward KL (1 - 1/u)
    torch.testing.assert_close(f_divergence_score(log_u, "alpha_divergence", 1.0), log_u)
    torch.testing.assert_close(f_divergence_score(log_u, "alpha_divergence", 0.0), f_divergence_score(log_u, "forward_kl"))


@pytest.mark.parametrize("f_divergence", ["forward_kl", "js_divergence", "alpha_divergence"])
def test_f_divergence_gradcheck_float64(f_divergence):
    per_token, mask, ref, len_w, len_l = random_pairs(5, seed=3)
    logps = per_token.sum(1).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: dpo_loss(x[:5], x[5:], ref[:5], ref[5:], loss_type=["sigmoid", "ipo"], f_divergence_type=f_divergence,
                           chosen_lengths=len_w, rejected_lengths=len_l)[0], (logps,))


def test_f_divergence_takes_the_loss_types_trl_takes():
    """TRL 1.16's ``DPOTrainer`` lists the loss types an f-divergence may change; prefmodule's are the same (TRL's
    ``sft`` loss type is prefmodule's ``sft_weight``, which any f-divergence allows)."""
    import inspect
    import re

    from trl import DPOTrainer

    listed = re.search(r"f_divergence_loss_types = \{([^}]*)\}", inspect.getsource(DPOTrainer.__init__)).group(1)
    assert set(re.findall(r'"(\w+)"', listed)) - {"sft"} == SCORE_LOSS_TYPES


def test_f_divergence_with_another_loss_type_is_a_configuration_error(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(CONFIGS / "dpo.yaml"), "--model.f_divergence_type=js_divergence",
              "--model.loss_type=[sigmoid, nca_pair]"])
    assert exit.value.code == 2
    message = capsys.readouterr().err
    assert "f_divergence_type" in message and "nca_pair" in message and "Traceback" not in message


def test_options_on_the_score_refuse_other_loss_types():
    x = torch.tensor([-1.0, -2.0])
    for option in ({"f_divergence_type": "forward_kl"}, {"dpop_lambda": 5.0}):
        with pytest.raises(ValueError, match="bco_pair"):
            dpo_loss(x, x, x, x, loss_type=["sigmoid", "bco_pair"], **option)
    with pytest.raises(ValueError, match="f_divergence_type must be one of"):
        dpo_loss(x, x, x, x, f_divergence_type="kl")


# ----- WPO and LD-DPO ---------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "bco_pair"])
def test_wpo_weighting_equals_trl(loss_type):
    per_token, mask, ref, len_w, len_l = random_pairs(6, seed=11)
    g = torch.Generator().manual_seed(5)
    log_sum_sq = -3.0 * torch.rand(per_token.shape, generator=g, dtype=torch.float64) * mask[:, 1:]
    expected, expected_grad = trl_loss_and_grad(per_token, mask, ref, loss_type, use_weighting=True,
                                                log_sum_sq_probs=log_sum_sq)
    stats = token_stats(per_token, mask)
    sum_sq = log_sum_sq.sum(1)
    weights = wpo_weights(stats.logps[:6], stats.logps[6:], sum_sq[:6], sum_sq[6:], len_w, len_l)
    losses, _, _ = dpo_loss(stats.logps[:6], stats.logps[6:], ref[:6], ref[6:], beta=0.1, loss_type=loss_type,
                            chosen_lengths=len_w, rejected_lengths=len_l)
    loss = (losses * weights).mean()
    (grad,) = torch.autograd.grad(loss, stats.token_logps)
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad[mask[:, 1:].bool()], rtol=1e-10, atol=1e-12)
    assert not weights.requires_grad and (weights - 1).abs().min() > 1e-3  # real weights, no gradient through them


def test_wpo_weights_by_hand():
    # chosen: logp -2 over 2 tokens, log sum p^2 -1 -> exp((-2 + 1) / 2); rejected: -3, -3 over 3 tokens -> exp(0)
    weights = wpo_weights(torch.tensor([-2.0]), torch.tensor([-3.0]), torch.tensor([-1.0]), torch.tensor([-3.0]),
                          torch.tensor([2]), torch.tensor([3]))
    torch.testing.assert_close(weights, torch.tensor([math.exp(-0.5)]))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_ld_dpo_equals_trl(alpha):
    per_token, mask, ref, len_w, len_l = random_pairs(6, seed=17)
    expected, expected_grad = trl_loss_and_grad(per_token, mask, ref, "sigmoid", ld_alpha=alpha)
    stats = token_stats(per_token, mask)
    public = torch.minimum(len_w, len_l).repeat(2)
    logps = ld_logps(stats.logps, stats.prefix_logps(public), alpha)
    losses, _, _ = dpo_loss(logps[:6], logps[6:], ref[:6], ref[6:], beta=0.1)
    (grad,) = torch.autograd.grad(losses.mean(), stats.token_logps)
    torch.testing.assert_close(losses.mean(), expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, expected_grad[mask[:, 1:].bool()], rtol=1e-10, atol=1e-12)
    assert (len_w != len_l).any()


def test_prefix_logps_and_ld_logps_by_hand():
    stats = SequenceStats(logps=torch.tensor([-6.0, -9.0]), lengths=torch.tensor([3, 2]), logits=torch.zeros(2),
                          token_logps=torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0]))
    torch.testing.assert_close(stats.prefix_logps(torch.tensor([2, 2])), torch.tensor([-3.0, -9.0]))
    torch.testing.assert_close(stats.prefix_logps(torch.tensor([0, 1])), torch.tensor([0.0, -4.0]))
    # -3 + 0.25 * (-6 + 3)
    torch.testing.assert_close(ld_logps(torch.tensor([-6.0]), torch.tensor([-3.0]), 0.25), torch.tensor([-3.75]))
    x = torch.tensor([-6.0, -2.5], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([-3.0, -1.0], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: ld_logps(a, b, 0.3), (x, y))


# ----- DPO-Positive ------------------------------------------------------------------------------------
def test_dpo_positive_by_hand_and_gradcheck():
    """Pal et al., 2024, Eq. 3: -log sigmoid(beta * (delta - lambda * max(0, ref_logp_w - logp_w)))."""
    pw, pl = torch.tensor([-5.0, -7.0], dtype=torch.float64), torch.tensor([-8.0, -6.0], dtype=torch.float64)
    rw, rl = torch.tensor([-6.0, -6.0], dtype=torch.float64), torch.tensor([-7.0, -7.0], dtype=torch.float64)
    losses, chosen_rewards, _ = dpo_loss(pw, pl, rw, rl, beta=0.1, dpop_lambda=5.0)
    # pair 0: chosen above its reference, no penalty: delta = 1 - (-1) = 2
    # pair 1: chosen 1 below: delta = -1 - 1 = -2, penalty 5 * 1
    expected = torch.tensor([-logsig(0.1 * 2), -logsig(0.1 * (-2 - 5))], dtype=torch.float64)
    torch.testing.assert_close(losses, expected)
    torch.testing.assert_close(chosen_rewards, torch.tensor([0.1, -0.1], dtype=torch.float64))  # rewards unchanged
    x = torch.tensor([-5.0, -7.0, -6.2], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-6.0, -6.0, -6.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda a: dpo_loss(a, r - 1, r, r, dpop_lambda=5.0, loss_type=["sigmoid", "hinge"])[0], (x,))


# ----- beta-DPO ----------------------------------------------------------------------------------------
def test_beta_dpo_statistics_and_beta_by_hand():
    gaps = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, std = beta_dpo_running_stats(gaps, torch.tensor(0.0), torch.tensor(0.0))  # the authors start at 0
    torch.testing.assert_close(mean, torch.tensor(0.1 * 3.0))
    torch.testing.assert_close(std, torch.tensor(0.1 * math.sqrt(14 / 3)))  # unbiased: (4 + 1 + 0 + 9) / 3
    mean, std = beta_dpo_running_stats(gaps, torch.tensor(1.0), torch.tensor(2.0), momentum=0.5)
    torch.testing.assert_close(mean, torch.tensor(2.0))
    selected = torch.tensor([True, True, False, True])
    # beta * (1 + alpha * (mean(1, 2, 6) - 2))
    torch.testing.assert_close(beta_dpo_beta(0.1, 0.6, gaps, selected, torch.tensor(2.0)), torch.tensor(0.1 * 1.6))
    assert beta_dpo_beta(0.1, 0.6, gaps, selected, torch.tensor(10.0)).item() == pytest.approx(1e-3)  # clamped


def test_beta_dpo_filter_draws_in_proportion_to_the_gaussian_weights():
    gaps, mean, std = torch.tensor([0.0, 1.0, 2.0, 4.0]), torch.tensor(1.0), torch.tensor(1.0)
    weights = torch.exp(-0.5 * (gaps - mean) ** 2)
    g = torch.Generator().manual_seed(0)

    def frequencies(gaps, mean, std, keep, draws):
        return torch.stack([beta_dpo_filter(gaps, mean, std, keep, u)
                            for u in torch.rand(draws, len(gaps), generator=g)]).float().mean(0)

    # one kept: drawn in proportion to the weights (standard error at most 0.007 over 5000 draws)
    torch.testing.assert_close(frequencies(gaps, mean, std, 1, 5000), weights / weights.sum(), rtol=0, atol=0.025)
    # keep 3 of 4: the outlier (4.0, weight e^-4.5 against at least e^-2) is nearly always the one left out
    assert frequencies(gaps, mean, std, 3, 500)[3] < 0.05
    # all margins equal, no spread yet (the first step): every pair as likely as any other
    firsts = frequencies(torch.zeros(4), torch.tensor(0.0), torch.tensor(0.0), 1, 1000)
    torch.testing.assert_close(firsts, torch.full((4,), 0.25), rtol=0, atol=0.05)


# ----- the per-token sums on every log-prob path ---------------------------------------------------------
@pytest.fixture(scope="module")
def full_and_chunked():
    return full_and_chunked_modules(DPOModule, ld_alpha=0.5)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_wpo_and_ld_sums_equal_on_full_and_chunked_logits(full_and_chunked, demo_rows, layout):
    batch = a_batch(full_and_chunked[0], demo_rows[:5])
    batch = packed(batch) if layout == "packed" else batch
    (full, full_ld), (chunked, chunked_ld) = [
        (m.forward(m.policy, batch.sequences, sum_sq_probs=True)[0], m.model_stats(m.policy, batch.sequences))
        for m in full_and_chunked
    ]
    torch.testing.assert_close(chunked.log_sum_sq_probs, full.log_sum_sq_probs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.token_logps, full.token_logps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(chunked_ld.logps, full_ld.logps, rtol=1e-5, atol=1e-5)
    chosen, rejected = full.lengths.chunk(2)
    public = torch.minimum(chosen, rejected).repeat(2)
    expected = full.prefix_logps(public) + 0.5 * (full.logps - full.prefix_logps(public))
    torch.testing.assert_close(full_ld.logps, expected)
    assert not torch.allclose(full_ld.logps, full.logps)  # the pairs' lengths differ


def test_log_sum_sq_probs_by_definition(demo_rows):
    module = DPOModule(model=TINY_MODEL, logps_chunk_size=0)
    module.configure_model()
    batch = a_batch(module, demo_rows[:2])
    with torch.no_grad():
        stats = module.model_stats(module.policy, batch.sequences, sum_sq_probs=True)
        sequences = batch.sequences
        probs = module.policy(input_ids=sequences.input_ids, attention_mask=sequences.attention_mask).logits.softmax(-1)
    mask = batch.sequences.labels[:, 1:] != -100
    expected = (probs[:, :-1] ** 2).sum(-1).log().double() * mask
    torch.testing.assert_close(stats.log_sum_sq_probs.double(), expected.sum(1), rtol=1e-5, atol=1e-5)


# ----- training with each option --------------------------------------------------------------------------
class StepLosses(L.Callback):
    def __init__(self):
        self.losses, self.betas = [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(outputs["loss"].item())
        self.betas.append(trainer.callback_metrics.get("train/beta"))


@pytest.mark.parametrize("options", [
    dict(use_weighting=True, ld_alpha=0.5, f_divergence_type="js_divergence", dpop_lambda=50.0, reference="precomputed"),
    dict(beta_dpo={"alpha": 0.6, "filter_ratio": 0.25}),
], ids=["wpo_ld_f_divergence_dpop", "beta_dpo"])
def test_the_options_train(options, tmp_path, small_data, demo_rows):
    train, _ = small_data
    L.seed_everything(0)
    module = DPOModule(model=TINY_MODEL, lr=1e-2, ref_cache_dir=str(tmp_path / "cache"), **options)
    losses = StepLosses()
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        callbacks=[losses])
    trainer.fit(module, datamodule=module.connect(PreferenceDataModule(train=train, batch_size=4)))
    assert len(losses.losses) == 3 and all(math.isfinite(x) for x in losses.losses)
    assert losses.losses[0] != losses.losses[-1]
    if "beta_dpo" in options:
        stats = module.beta_dpo_margin_stats
        assert stats[1] > 0 and losses.betas[-1] is not None and losses.betas[-1] != pytest.approx(0.1)
    if options.get("reference") == "precomputed":  # the cached reference holds LD-DPO's log-probs
        start = DPOModule(model=TINY_MODEL, ld_alpha=0.5)
        start.configure_model()
        batch = a_batch(start, demo_rows[:4])  # the train file's first rows: index 0..3
        torch.testing.assert_close(module.reference.tables["train"][:4], start.reference_logps(batch),
                                   rtol=1e-5, atol=1e-5)
        plain = DPOModule(model=TINY_MODEL)
        plain.configure_model()
        assert not torch.allclose(module.reference.tables["train"][:4], plain.reference_logps(batch), rtol=1e-3)
