"""Log-probs from the final hidden states in chunks equal the full-logits way, values and gradients."""

import dataclasses

import pytest
import torch
from transformers import (
    AutoModelForCausalLM, CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig, LlamaForCausalLM,
)

from prefmodule import ORPOModule
from prefmodule.data.batches import Sequences
from prefmodule.data.collate import PreferenceCollator
from prefmodule.data.tokenize import tokenize_pair
from prefmodule.models.logps import (
    IGNORE_INDEX, LinearLogSoftmax, LogitsTransform, head_logits_transform, is_plain_linear, stats_from_hidden,
    stats_from_logits,
)

from conftest import TINY_MODEL, full_and_chunked_modules


def a_batch(module, rows):
    pairs = [{"index": i, **tokenize_pair(module.tokenizer, r["prompt"], r["chosen"], r["rejected"])}
             for i, r in enumerate(rows)]
    return PreferenceCollator(module.tokenizer.pad_token_id)(pairs)


def packed(batch):
    """The padded batch as one row: sequences back to back, positions restarting, ``sequence_ids``."""
    padded = batch.sequences
    keep = padded.attention_mask.bool()
    lengths = keep.sum(1)
    return dataclasses.replace(batch, sequences=Sequences(
        padded.input_ids[keep][None], padded.labels[keep][None], torch.ones(1, int(lengths.sum()), dtype=torch.long),
        padded.count, torch.cat([torch.arange(n) for n in lengths.tolist()])[None],
        torch.repeat_interleave(torch.arange(len(lengths)), lengths)[None]))


def stats_and_grads(module, batch):
    module.policy.zero_grad()
    stats = module.model_stats(module.policy, batch.sequences)
    (stats.logps * torch.linspace(-1.0, 2.0, len(stats.logps))).sum().backward()  # every sequence weighs differently
    return stats, {n: p.grad.clone() for n, p in module.policy.named_parameters()}


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def plain_and_chunked():
    return full_and_chunked_modules(ORPOModule)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_chunked_equals_plain_values_and_gradients(plain_and_chunked, demo_rows, layout):
    plain, chunked = plain_and_chunked
    batch = a_batch(plain, demo_rows[:6])
    batch = packed(batch) if layout == "packed" else batch
    (expected, expected_grads), (actual, actual_grads) = (stats_and_grads(m, batch) for m in plain_and_chunked)
    torch.testing.assert_close(actual.logps, expected.logps, rtol=1e-5, atol=0)
    torch.testing.assert_close(actual.logits, expected.logits, rtol=1e-5, atol=1e-6)
    assert torch.equal(actual.lengths, expected.lengths)
    assert expected.lengths.min() > 0 and (expected.logps < -1).all()
    assert expected_grads.keys() == actual_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.norm() > 0, name
        assert relative_error(actual_grads[name], grad) < 1e-5, name


def test_chunked_saves_no_vocabulary_sized_tensor_for_backward(plain_and_chunked, demo_rows):
    batch = a_batch(plain_and_chunked[0], demo_rows[:6])
    rows, length = batch.sequences.input_ids.shape
    vocab = plain_and_chunked[0].policy.config.vocab_size
    saved_vocab_rows = {}
    for module in plain_and_chunked:
        shapes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(t.shape) or t, lambda t: t):
            module.model_stats(module.policy, batch.sequences)
        saved_vocab_rows[module.model_settings.logps_chunk_size] = max(
            (s.numel() // vocab for s in shapes if s and s[-1] == vocab), default=0)
    assert saved_vocab_rows == {0: rows * (length - 1), 7: 0}  # chunks are recomputed, not saved


SHAPE = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, head_dim=16)


class WrappedHead(torch.nn.Linear):  # not a plain nn.Linear: takes the checkpointed module path
    pass


@pytest.mark.parametrize("config, transform", [
    (Gemma2Config(**SHAPE, final_logit_softcapping=2.0), LogitsTransform(softcap=2.0)),
    (CohereConfig(**SHAPE, logit_scale=0.25), LogitsTransform(scale=0.25)),
    (GraniteConfig(**SHAPE, logits_scaling=4.0), LogitsTransform(scale=0.25)),
], ids=["gemma2-softcap", "cohere-scale", "granite-scaling"])
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "module"])
def test_scaled_and_soft_capped_logits_chunk_like_the_models_own(config, transform, fused):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    head = model.get_output_embeddings()
    with torch.no_grad():
        head.weight.mul_(40.0)  # logits of a few units: the soft-cap bends them
    assert head_logits_transform(model) == transform
    if not fused:
        wrapped = WrappedHead(SHAPE["hidden_size"], SHAPE["vocab_size"], bias=False)
        wrapped.weight = head.weight
        model.set_output_embeddings(wrapped)
    input_ids = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :4] = IGNORE_INDEX
    weights = torch.tensor([-1.0, 0.5, 2.0])
    results = []
    for chunked in (False, True):
        model.zero_grad()
        if chunked:
            hidden = model.get_decoder()(input_ids=input_ids).last_hidden_state
            stats = stats_from_hidden(hidden, model.get_output_embeddings(), labels, 4, transform=transform)
        else:
            stats = stats_from_logits(model(input_ids=input_ids).logits, labels)
        (stats.logps * weights).sum().backward()
        results.append((stats, [p.grad.clone() for p in model.parameters()]))
    (full, full_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked.logps, full.logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(chunked.logits, full.logits, rtol=1e-5, atol=1e-5)
    for chunked_grad, full_grad in zip(chunked_grads, full_grads):
        assert relative_error(chunked_grad, full_grad) < 1e-5
    plain = stats_from_logits(head(model.get_decoder()(input_ids=input_ids).last_hidden_state), labels)
    assert (plain.logps - full.logps).abs().max() > 0.1  # the transform matters at these logits


def test_a_transform_the_model_does_not_apply_keeps_the_full_logits():
    llama = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    assert head_logits_transform(llama) == LogitsTransform()
    llama.config.final_logit_softcapping = 1.0  # Llama's forward ignores it: the probe sees that
    assert head_logits_transform(llama) is None
    assert head_logits_transform(torch.nn.Linear(2, 2)) is None  # no decoder and head to call


def test_soft_capped_head_passes_gradcheck():
    torch.manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 7])
    transform = LogitsTransform(scale=0.5, softcap=1.5)
    assert torch.autograd.gradcheck(lambda h, w: LinearLogSoftmax.apply(h, w, None, targets, transform)[0],
                                    (hidden, weight))
    logps, _ = LinearLogSoftmax.apply(hidden, weight, None, targets, transform)
    expected = torch.log_softmax(1.5 * torch.tanh(0.5 * hidden @ weight.T / 1.5), -1).gather(-1, targets[:, None])
    torch.testing.assert_close(logps, expected.squeeze(-1))


def test_gradient_checkpointing_gives_the_same_gradients(plain_and_chunked, demo_rows):
    module = ORPOModule(model=TINY_MODEL, logps_chunk_size=7, gradient_checkpointing=True)
    module.configure_model()
    assert module.policy.is_gradient_checkpointing
    batch = a_batch(module, demo_rows[:4])
    (expected, expected_grads), (actual, actual_grads) = (
        stats_and_grads(m, batch) for m in (plain_and_chunked[1], module))
    torch.testing.assert_close(actual.logps, expected.logps, rtol=1e-6, atol=0)
    for name, grad in expected_grads.items():
        assert relative_error(actual_grads[name], grad) < 1e-6, name


def test_negative_chunk_size_fails_at_construction():
    with pytest.raises(ValueError, match="logps_chunk_size"):
        ORPOModule(model=TINY_MODEL, logps_chunk_size=-1)


def test_labels_all_ignored_give_zero_sums(plain_and_chunked, demo_rows):
    chunked = plain_and_chunked[1]
    batch = a_batch(chunked, demo_rows[:2])
    batch.sequences.labels = torch.full_like(batch.sequences.labels, IGNORE_INDEX)
    stats = chunked.model_stats(chunked.policy, batch.sequences)
    assert torch.equal(stats.logps, torch.zeros(4)) and torch.equal(stats.lengths, torch.zeros(4, dtype=torch.long))


def reference_head_logps(head, hidden, targets):
    logits = head(hidden).float()
    return torch.log_softmax(logits, -1).gather(-1, targets[:, None]).squeeze(-1), logits.mean(-1)


def test_fused_head_passes_gradcheck_with_a_bias():
    torch.manual_seed(0)
    hidden = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(11, dtype=torch.float64, requires_grad=True)
    targets = torch.tensor([0, 3, 10, 3, 7])
    assert torch.autograd.gradcheck(lambda h, w, b: LinearLogSoftmax.apply(h, w, b, targets)[0],
                                    (hidden, weight, bias))
    head = torch.nn.Linear(6, 11).double()
    with torch.no_grad():
        head.weight.copy_(weight), head.bias.copy_(bias)
    logps, mean_logits = LinearLogSoftmax.apply(hidden, weight, bias, targets)
    expected_logps, expected_mean = reference_head_logps(head, hidden, targets)
    torch.testing.assert_close(logps, expected_logps.double())
    torch.testing.assert_close(mean_logits, expected_mean.float())
    assert logps.max() < 0 and not mean_logits.requires_grad


def test_fused_head_under_bf16_autocast_matches_the_module_path():
    torch.manual_seed(0)
    head = torch.nn.Linear(32, 500, bias=False)
    hidden = torch.randn(40, 32, requires_grad=True)
    targets = torch.randint(0, 500, (40,))
    weights = torch.linspace(-1.0, 2.0, 40)
    results = []
    for run in (lambda: LinearLogSoftmax.apply(hidden, head.weight, None, targets)[0],
                lambda: reference_head_logps(head, hidden, targets)[0]):
        hidden.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logps = run()
        (logps * weights).sum().backward()
        assert logps.dtype == torch.float32 and head.weight.grad.dtype == torch.float32
        results.append((logps.detach(), hidden.grad.clone(), head.weight.grad.clone()))
    for fused, module_path in zip(*results):
        torch.testing.assert_close(fused, module_path, rtol=2e-2, atol=2e-2)


def test_only_a_plain_linear_head_is_fused():
    head = torch.nn.Linear(4, 8)
    assert is_plain_linear(head)
    hooked = torch.nn.Linear(4, 8)
    hooked.register_forward_pre_hook(lambda module, args: None)  # what FSDP2 / ZeRO-3 do to gather weights
    assert not is_plain_linear(hooked)

    class Wrapped(torch.nn.Linear):  # a LoRA layer, an FSDP2-sharded class
        pass

    assert not is_plain_linear(Wrapped(4, 8))
