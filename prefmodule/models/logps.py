"""Per-sequence log-probabilities of the response tokens, in float32.

A batch row holds ``prompt + response + padding``; ``labels`` holds the token ids of the
response and ``-100`` everywhere else, so only response tokens count (SPEC.md §2).

A *packed* batch (``padding_free``) is one row holding every sequence back to back, with
``position_ids`` restarting at 0 for each and ``sequence_ids`` naming the sequence (0 .. rows-1)
each token belongs to. Its first token of every sequence is a prompt token, so no label crosses
a sequence boundary.

Two ways give the same numbers: :func:`stats_from_logits` from the model's full logits, and
:func:`stats_from_hidden` from the final hidden states through the LM head, a chunk of
response tokens at a time, never holding ``[rows, T, vocab]`` logits. Models that scale or
soft-cap their head's output (Gemma 2, Cohere, Granite) get the same :class:`LogitsTransform`
per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from prefmodule.private.torch import has_forward_hooks

IGNORE_INDEX = -100


@dataclass
class SequenceStats:
    """Sums over the response tokens of each sequence, shape ``[sequences]``."""

    logps: torch.Tensor  # sum_t log pi(y_t | x, y_<t)
    lengths: torch.Tensor  # number of response tokens
    logits: torch.Tensor  # sum over response tokens of the vocabulary-mean logit (detached)
    # Per response token, sequence after sequence in order (a batch's stats, not a split's): log pi(y_t | x, y_<t)
    token_logps: torch.Tensor | None = None
    # On request (``sum_sq_probs``): sum_t log sum_v pi(v | x, y_<t)^2 per sequence (detached; WPO's weights)
    log_sum_sq_probs: torch.Tensor | None = None
    # On request (``entropy``): per response token, as ``token_logps``, -sum_v pi(v | x, y_<t) log pi(v | x, y_<t)
    # (detached; GRPO's ``entropy`` metric)
    token_entropy: torch.Tensor | None = None

    @property
    def avg_logps(self) -> torch.Tensor:
        """Length-normalised log-probability: log of the geometric-mean token probability."""
        return self.logps / self.lengths.clamp(min=1)

    def split(self) -> tuple[SequenceStats, SequenceStats]:
        """Split the concatenated batch into its chosen (first half) and rejected sequences."""
        half = self.logps.shape[0] // 2
        return self.select(slice(None, half)), self.select(slice(half, None))

    def select(self, rows: slice | torch.Tensor) -> SequenceStats:
        """The per-sequence statistics of ``rows`` (a slice or a boolean mask)."""
        sum_sq = self.log_sum_sq_probs
        return SequenceStats(self.logps[rows], self.lengths[rows], self.logits[rows],
                             log_sum_sq_probs=None if sum_sq is None else sum_sq[rows])

    def prefix_logps(self, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """``[sequences]``: the log-prob of each sequence's first ``prefix_lengths`` response tokens."""
        owners = torch.repeat_interleave(torch.arange(len(self.lengths), device=self.lengths.device), self.lengths,
                                         output_size=self.token_logps.numel())
        starts = self.lengths.cumsum(0) - self.lengths
        position = torch.arange(owners.numel(), device=owners.device) - starts[owners]
        in_prefix = position < prefix_lengths.to(owners.device)[owners]
        return self.token_logps.new_zeros(len(self.lengths)).index_add(0, owners, self.token_logps * in_prefix)

    def padded(self, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token ``values`` (default ``token_logps``: flat, sequence after sequence) as ``[sequences, T]``,
        right-padded with 0 to the longest response, and the ``[sequences, T]`` mask of real tokens (differentiable
        in ``values``)."""
        values = self.token_logps if values is None else values
        width = int(self.lengths.max()) if self.lengths.numel() else 0
        mask = torch.arange(width, device=self.lengths.device) < self.lengths[:, None]
        matrix = values.new_zeros(mask.shape).masked_scatter(mask, values)
        return matrix, mask


@dataclass(frozen=True)
class LogitsTransform:
    """What a model does to its LM head's output ``z`` to get its logits, in the model's own order:
    ``z * scale``, then ``cap * tanh(z / cap)`` with ``softcap`` (Gemma 2's ``final_logit_softcapping``,
    Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> LogitsTransform:
        """The transform ``config`` names (identity for most models)."""
        scale = getattr(config, "logit_scale", None) or 1.0
        if getattr(config, "logits_scaling", None):
            scale = 1.0 / config.logits_scaling
        return cls(float(scale), getattr(config, "final_logit_softcapping", None))

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    def backward_(self, grad: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """``grad`` w.r.t. the transformed ``logits`` -> w.r.t. the head's output, in place (``logits`` is
        consumed): ``d/dz cap * tanh(s z / cap) = s * (1 - (logits / cap)^2)``."""
        if self.softcap is not None:
            grad.mul_(logits.div_(self.softcap).square_().neg_().add_(1.0))
        return grad.mul_(self.scale) if self.scale != 1.0 else grad


def shifted_targets(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets aligned with logits (position ``t`` predicts token ``t + 1``) and their mask."""
    targets = labels[:, 1:]
    return targets, targets != IGNORE_INDEX


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[target]`` per position in float32 (0 where the target is ignored).

    ``logits`` is ``[..., vocab]`` for ``targets [...]``. ``-cross_entropy`` never materialises a
    second vocabulary-sized tensor of log-probs.
    """
    return -F.cross_entropy(
        logits.float().flatten(0, -2), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)


def response_owners(mask: torch.Tensor, sequence_ids: torch.Tensor | None) -> torch.Tensor:
    """The sequence each response token (the ``True`` entries of ``mask``, in row-major order) belongs to."""
    if sequence_ids is None:
        return mask.nonzero()[:, 0]
    return sequence_ids[:, 1:][mask]  # aligned with the shifted targets


def per_sequence(token_logps: torch.Tensor, token_mean_logits: torch.Tensor, owners: torch.Tensor,
                 num_sequences: int, token_log_sum_sq: torch.Tensor | None = None,
                 token_entropy: torch.Tensor | None = None) -> SequenceStats:
    """Sum per-response-token values ``[tokens]`` into their sequences (the entropy stays per token)."""
    def total(values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(num_sequences).index_add(0, owners, values)

    return SequenceStats(
        logps=total(token_logps),
        lengths=torch.bincount(owners, minlength=num_sequences),
        logits=total(token_mean_logits.detach()),
        token_logps=token_logps,
        log_sum_sq_probs=None if token_log_sum_sq is None else total(token_log_sum_sq),
        token_entropy=token_entropy,
    )


def log_sum_sq_probs(logits: torch.Tensor) -> torch.Tensor:
    """``log sum_v softmax(logits)_v^2`` over the last dimension, in float32, without gradient."""
    with torch.no_grad():
        logits = logits.float()
        return torch.logsumexp(2 * logits, dim=-1) - 2 * torch.logsumexp(logits, dim=-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """``-sum_v p_v log p_v`` of ``softmax(logits)`` over the last dimension, in float32, without gradient."""
    with torch.no_grad():
        logps = torch.log_softmax(logits.float(), dim=-1)
        return -(logps.exp() * logps).sum(-1)


def token_extras(logits: torch.Tensor, sum_sq_probs: bool, token_entropy: bool) -> tuple:
    """``(log sum_v p_v^2, entropy)`` per row of ``logits`` as asked (``None`` where not), without gradient."""
    return (log_sum_sq_probs(logits) if sum_sq_probs else None, entropy(logits) if token_entropy else None)


def stats_from_logits(logits: torch.Tensor, labels: torch.Tensor, sequence_ids: torch.Tensor | None = None,
                      num_sequences: int | None = None, sum_sq_probs: bool = False,
                      token_entropy: bool = False) -> SequenceStats:
    """Reduce ``logits [rows, T, vocab]`` for ``labels [rows, T]`` to per-sequence response sums.

    Padded batches need only ``logits`` and ``labels``; packed batches also pass ``sequence_ids``
    and ``num_sequences``. ``sum_sq_probs`` also sums ``log sum_v p_v^2`` (WPO's weights); ``token_entropy``
    keeps each response token's entropy.
    """
    logits = logits[:, :-1]
    targets, mask = shifted_targets(labels)
    logps = token_logps(logits, targets)
    with torch.no_grad():
        mean_logits = logits.mean(-1, dtype=torch.float32)
    rows = num_sequences if sequence_ids is not None else labels.shape[0]
    sum_sq, entropies = token_extras(logits[mask], sum_sq_probs, token_entropy) if sum_sq_probs or token_entropy \
        else (None, None)
    return per_sequence(logps[mask], mean_logits[mask], response_owners(mask, sequence_ids), rows, sum_sq, entropies)


def stats_from_hidden(hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, chunk_size: int,
                      sequence_ids: torch.Tensor | None = None, num_sequences: int | None = None,
                      transform: LogitsTransform = LogitsTransform(), sum_sq_probs: bool = False,
                      token_entropy: bool = False) -> SequenceStats:
    """:func:`stats_from_logits` from the final hidden states ``[rows, T, hidden]``, the LM ``head`` and
    the model's ``transform`` of the head's output.

    Only response positions go through the head, ``chunk_size`` tokens at a time; with gradients
    on, each chunk's logits are dropped after its forward and recomputed in backward, so at most
    ``chunk_size x vocab`` logits exist at once. A plain ``nn.Linear`` head takes the fused
    :class:`LinearLogSoftmax`; any other head (LoRA, FSDP2-sharded, ...) is called as a module.
    ``sum_sq_probs`` (``log sum_v p_v^2``) and ``token_entropy`` run the chunks through the head once more,
    without gradient.
    """
    targets, mask = shifted_targets(labels)
    hidden, targets = hidden[:, :-1][mask], targets[mask]
    run = _fused_head_stats if is_plain_linear(head) else _checkpointed_head_stats
    chunks = [run(head, hidden[i: i + chunk_size], targets[i: i + chunk_size], transform)
              for i in range(0, targets.numel(), chunk_size)] or [_head_stats(head, hidden, targets, transform)]
    logps, mean_logits = (torch.cat(values) for values in zip(*chunks))
    rows = num_sequences if sequence_ids is not None else labels.shape[0]
    sum_sq = entropies = None
    if sum_sq_probs or token_entropy:  # one more pass through the head, without gradient, a chunk at a time
        with torch.no_grad():
            extras = [token_extras(transform(head(hidden[i: i + chunk_size])), sum_sq_probs, token_entropy)
                      for i in range(0, max(1, targets.numel()), chunk_size)]
        sum_sq, entropies = (torch.cat(values) if values[0] is not None else None for values in zip(*extras))
    return per_sequence(logps, mean_logits, response_owners(mask, sequence_ids), rows, sum_sq, entropies)


def is_plain_linear(head: nn.Module) -> bool:
    """Whether calling ``head`` is exactly ``F.linear`` on its own parameters: no wrapper class (LoRA,
    FSDP2) and no hooks that gather or swap its weights (FSDP2, DeepSpeed ZeRO-3)."""
    return type(head) is nn.Linear and not has_forward_hooks(head) and type(head.weight) is nn.Parameter


def _head_stats(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                transform: LogitsTransform) -> tuple[torch.Tensor, torch.Tensor]:
    logits = transform(head(hidden))
    return token_logps(logits, targets), logits.mean(-1, dtype=torch.float32)


def _checkpointed_head_stats(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                             transform: LogitsTransform) -> tuple[torch.Tensor, torch.Tensor]:
    if not torch.is_grad_enabled():
        return _head_stats(head, hidden, targets, transform)
    return checkpoint(_head_stats, head, hidden, targets, transform, use_reentrant=False)


def _fused_head_stats(head: nn.Linear, hidden: torch.Tensor, targets: torch.Tensor,
                      transform: LogitsTransform) -> tuple[torch.Tensor, torch.Tensor]:
    return LinearLogSoftmax.apply(hidden, head.weight, head.bias, targets, transform)


class LinearLogSoftmax(torch.autograd.Function):
    """``log softmax(T(hidden @ weight.T + bias))[target]`` per row, and the row's mean logit, keeping
    only ``hidden`` and a log-sum-exp per row for backward (``T``: a :class:`LogitsTransform`).

    Backward recomputes the logits ``z`` and uses ``d logp / dz = onehot(target) - softmax(z)``
    directly, in place on the one ``[rows, vocab]`` buffer: no log-softmax recompute, no zeros to
    scatter into; a soft-cap's derivative takes a second buffer. Under autocast the head and ``T``
    run in the autocast dtype, both ways, as in the model's own forward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform=LogitsTransform()):
        logits = transform(F.linear(hidden, weight, bias))
        accumulate = torch.promote_types(logits.dtype, torch.float32)  # float32, or float64 for float64 weights
        logps_all = torch.log_softmax(logits.to(accumulate), dim=-1)
        logps = logps_all.gather(-1, targets[:, None]).squeeze(-1)
        log_norm = logits.gather(-1, targets[:, None]).squeeze(-1).to(accumulate) - logps
        mean_logits = logits.mean(-1, dtype=torch.float32)
        ctx.compute_dtype, ctx.transform = logits.dtype, transform
        ctx.save_for_backward(hidden, weight, bias, targets, log_norm)
        ctx.mark_non_differentiable(mean_logits)
        return logps, mean_logits

    @staticmethod
    def backward(ctx, grad_logps, _grad_mean_logits):
        hidden, weight, bias, targets, log_norm = ctx.saved_tensors
        dtype, transform = ctx.compute_dtype, ctx.transform
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            logits = transform(F.linear(h, w, None if bias is None else bias.to(dtype))).to(log_norm.dtype)
            capped = logits.clone() if transform.softcap is not None else None  # the cap's derivative needs them
            grad_logits = logits.sub_(log_norm[:, None]).exp_().mul_(-grad_logps[:, None])  # -g * softmax
            grad_logits[torch.arange(targets.numel(), device=targets.device), targets] += grad_logps
            grad_logits = transform.backward_(grad_logits, capped).to(dtype)
            grad_hidden = (grad_logits @ w).to(hidden.dtype) if ctx.needs_input_grad[0] else None
            grad_weight = (grad_logits.T @ h).to(weight.dtype) if ctx.needs_input_grad[1] else None
            grad_bias = grad_logits.sum(0).to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None


def head_logits_transform(model: nn.Module) -> LogitsTransform | None:
    """How ``model``'s logits follow from its output embeddings applied to its decoder's last hidden
    state, so that :func:`stats_from_hidden` may stand in for its forward; ``None`` if they do not.

    The transform its config names (:meth:`LogitsTransform.of`) is checked on an 8-token probe rather
    than trusted: a model that changes its logits some other way answers ``None``. (``model`` may be a
    small stand-in of the architecture: the answer is a property of its code and config.)
    """
    training = model.training
    model.eval()  # no dropout
    try:
        head, decoder = model.get_output_embeddings(), model.get_decoder()
        transform = LogitsTransform.of(model.config)
        vocab = model.get_input_embeddings().num_embeddings
        probe = torch.arange(1, 9, device=model.get_input_embeddings().weight.device).remainder(vocab)[None]
        with torch.no_grad():
            logits = model(input_ids=probe, use_cache=False).logits
            hidden = decoder(input_ids=probe, use_cache=False).last_hidden_state
            same = torch.allclose(logits, transform(head(hidden)), rtol=1e-6, atol=0)
    except (AttributeError, TypeError, NotImplementedError):  # no separate decoder and head to call
        return None
    finally:
        model.train(training)
    return transform if same else None
