"""Fused losses that never materialize [tokens, vocab] logits.

    loss = fastft.losses.fused_linear_distillation(student_hidden, student_weight, teacher_hidden, teacher_weight,
                                                   labels, beta=0.5, temperature=2.0)
    loss = fastft.losses.fused_linear_cross_entropy(hidden, lm_head_weight, labels)  # F.cross_entropy's value
    logprob = fastft.losses.fused_linear_logprobs(hidden, lm_head_weight, labels)  # log softmax(logits)[label]
    out = fastft.losses.fused_linear_policy_logprobs(hidden, lm_head_weight, labels, PolicyGradientTerms(...))
    # the same log-probabilities, the gradients of a token-local policy loss on them taken in the forward pass

Semantics are TRL's generalized JSD and Hinton's KD (fastft/reference/distillation.py): soft term JSD(beta)
between teacher and student at temperature T (beta=0 forward KL(P||Q), beta=1 reverse KL(Q||P)), times T^2 when
scale_by_t2; plus (1 - alpha) * cross-entropy of the student at T=1 when labels are given; tokens labelled
ignore_index count in neither term; "mean" divides by the valid tokens (or by num_items_in_batch), "sum" and
"none" (per token, shaped like labels) also. teacher_topk=k approximates the soft term with the teacher's k most
likely tokens plus one bucket for the rest of each distribution. Only the student gets gradients, and its head only when it
requires grad. The loss is fp32 (fp64 for fp64 inputs); logits are accumulated in fp32 for bf16/fp16 inputs.

What the arguments must be (anything else raises a ValueError or TypeError naming the argument):
- beta, alpha: real numbers in [0, 1].
- temperature: a finite real number in [TEMPERATURE_MIN, TEMPERATURE_MAX] = [0.01, 100], which holds the
  temperatures distillation uses (about 0.5 to 20). Outside it fp32 logits / T no longer carry the loss.
  Below, the soft term and its gradient grow as 1 / T and the logits' fp32 rounding with them: measured on
  random logits of std 1 to 3, the fp32 loss is ~1e-6 off the fp64 one at T = 0.01, ~1e-3 at T = 1e-4, 6% at
  T = 1e-6, 11 orders of magnitude at T = 1e-8, and inf / nan at T = 1e-30. Above, the soft term shrinks as
  (logit differences / T)^2 under the resolution of fp32 log-probabilities: ~1e-3 off at T = 100, up to
  ~1e-1 at T = 1000, tens of percent at T = 10^4 (and T^2 overflows fp32 past ~1e19).
- teacher_topk: None or an int in 1..vocab - 1 (a bool is not an int here).
- num_items_in_batch: None, a finite number > 0, or a one-element integer / floating tensor holding one.
- labels: integer, shaped like the hidden states' leading dims, every value in [0, vocab) or ignore_index.
- scale_by_t2: a bool; ignore_index: an int; reduction: "mean", "sum" or "none".
The checks of labels' values and of a tensor num_items_in_batch read the tensors: they run when the loss is
computed (inside the fastft::fused_linear_distillation op, so in eager mode and in torch.compile'd graphs alike) with
one device-to-host copy of two flags, and are skipped while a CUDA graph is being captured (no copy is allowed
there). The other checks look only at Python values and tensor metadata.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

from fastft.ops import distillation as ops
from fastft.ops import logprobs as logprob_ops
from fastft.ops import policy_logprobs as policy_ops

REDUCTIONS = ("mean", "sum", "none")
TEMPERATURE_MIN, TEMPERATURE_MAX = 0.01, 100.0


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_options(*, beta=0.0, temperature=1.0, alpha=1.0, scale_by_t2=False, ignore_index=-100, reduction="mean",
                  teacher_topk=None) -> None:
    """Raises for options of fused_linear_distillation outside what the module doc allows (teacher_topk's upper
    bound, the vocabulary size, is checked with the tensors)."""
    for name, value in (("beta", beta), ("alpha", alpha), ("temperature", temperature)):
        if not _is_real(value):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if not TEMPERATURE_MIN <= temperature <= TEMPERATURE_MAX:
        raise ValueError(f"temperature must be finite and in [{TEMPERATURE_MIN}, {TEMPERATURE_MAX:g}] (fp32 cannot "
                         f"carry the loss outside; see fastft.losses), got {temperature}")
    if not isinstance(scale_by_t2, bool):
        raise TypeError(f"scale_by_t2 must be a bool, got {type(scale_by_t2).__name__} {scale_by_t2!r}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if teacher_topk is not None:
        if not isinstance(teacher_topk, numbers.Integral) or isinstance(teacher_topk, bool):
            raise TypeError(f"teacher_topk must be None or an int k (the teacher's k most likely tokens), got "
                            f"{type(teacher_topk).__name__} {teacher_topk!r}")
        if teacher_topk < 1:
            raise ValueError(f"teacher_topk must be None or an int >= 1, got {teacher_topk}")


def _check_num_items_in_batch(num_items_in_batch, reduction: str) -> None:
    if num_items_in_batch is None:
        return
    if reduction != "mean":
        raise ValueError("num_items_in_batch applies to reduction='mean' only")
    if isinstance(num_items_in_batch, Tensor):
        if num_items_in_batch.numel() != 1 or num_items_in_batch.dtype == torch.bool or \
                num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must be a number > 0 or a one-element integer / floating tensor, got "
                            f"a {num_items_in_batch.dtype} tensor of shape {tuple(num_items_in_batch.shape)}")
        return  # its value is checked where the loss is computed (fastft.ops.distillation.check_values)
    if not _is_real(num_items_in_batch):
        raise TypeError(f"num_items_in_batch must be None, a number > 0 or a one-element tensor, got "
                        f"{type(num_items_in_batch).__name__} {num_items_in_batch!r}")
    if not (math.isfinite(num_items_in_batch) and num_items_in_batch > 0):
        raise ValueError(f"num_items_in_batch must be a finite number > 0 (the mean's denominator) or None, got "
                         f"{num_items_in_batch}")


def _check_labels_meta(labels, leading) -> None:
    if not isinstance(labels, Tensor) or labels.dtype not in (torch.int64, torch.int32) or labels.shape != leading:
        raise ValueError(f"labels must be integer with shape {tuple(leading)}, got "
                         f"{getattr(labels, 'dtype', type(labels).__name__)} {tuple(getattr(labels, 'shape', ()))}")


def _check(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, beta,
           temperature, alpha, scale_by_t2, ignore_index, reduction, num_items_in_batch, teacher_topk):
    check_options(beta=beta, temperature=temperature, alpha=alpha, scale_by_t2=scale_by_t2,
                  ignore_index=ignore_index, reduction=reduction, teacher_topk=teacher_topk)
    _check_gathered(student_hidden=student_hidden, student_weight=student_weight, teacher_hidden=teacher_hidden,
                    teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias)
    for name, t in (("student_hidden", student_hidden), ("student_weight", student_weight),
                    ("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if student_weight.dim() != 2 or teacher_weight.dim() != 2:
        raise ValueError("student_weight and teacher_weight must be 2-D (vocab, hidden)")
    if student_hidden.shape[-1] != student_weight.shape[1]:
        raise ValueError(f"student_hidden's last dim {student_hidden.shape[-1]} must equal student_weight's hidden "
                         f"size {student_weight.shape[1]}")
    if teacher_hidden.shape[-1] != teacher_weight.shape[1]:
        raise ValueError(f"teacher_hidden's last dim {teacher_hidden.shape[-1]} must equal teacher_weight's hidden "
                         f"size {teacher_weight.shape[1]}")
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]}")
    if student_hidden.shape[:-1] != teacher_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} and teacher_hidden "
                         f"{tuple(teacher_hidden.shape)} must have the same leading (token) dims")
    if labels is not None:
        _check_labels_meta(labels, student_hidden.shape[:-1])
    for name, bias, weight in (("student_bias", student_bias, student_weight),
                               ("teacher_bias", teacher_bias, teacher_weight)):
        if bias is not None and bias.shape != (weight.shape[0],):
            raise ValueError(f"{name} must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    devices = {t.device for t in (student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                                  student_bias, teacher_bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    if alpha != 1.0 and labels is None:
        raise ValueError(f"alpha={alpha} weighs a cross-entropy term, which needs labels")
    if teacher_topk is not None and not teacher_topk < student_weight.shape[0]:
        raise ValueError(f"teacher_topk must be in 1..{student_weight.shape[0] - 1} (vocab - 1), got {teacher_topk}")
    _check_num_items_in_batch(num_items_in_batch, reduction)


def _denominator(reduction: str, num_items_in_batch, flat_labels: Tensor | None, ignore_index: int, rows: int,
                 device: torch.device) -> Tensor:
    """What a "mean" divides the summed per-token losses by, as an fp64 scalar tensor on the inputs' device (no host
    sync, so torch.compile keeps one graph): num_items_in_batch as given (the op raises unless it is > 0 and
    finite), else the tokens not ignored, 1 where that is 0 (no token counts: the loss is 0)."""
    if reduction != "mean":
        return torch.ones((), dtype=torch.float64, device=device)
    if num_items_in_batch is not None:
        return torch.as_tensor(num_items_in_batch, dtype=torch.float64, device=device).reshape(())
    if flat_labels is not None:
        denominator = (flat_labels != ignore_index).sum().to(torch.float64)
    else:
        denominator = torch.full((), float(rows), dtype=torch.float64, device=device)
    return torch.where(denominator == 0, 1.0, denominator)


def fused_linear_distillation(student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                              teacher_weight: Tensor, labels: Tensor | None = None, *,
                              student_bias: Tensor | None = None, teacher_bias: Tensor | None = None,
                              beta: float = 0.0, temperature: float = 1.0, alpha: float = 1.0,
                              scale_by_t2: bool = False, ignore_index: int = -100, reduction: str = "mean",
                              num_items_in_batch: int | Tensor | None = None,
                              teacher_topk: int | None = None) -> Tensor:
    """Distillation loss from hidden states (..., H_s), (..., H_t) and heads (V, H_s), (V, H_t); see the module doc
    for the formulas and for what each argument must be (temperature in [0.01, 100], num_items_in_batch > 0, labels
    in [0, V) or ignore_index, ...)."""
    _check(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, beta,
           temperature, alpha, scale_by_t2, ignore_index, reduction, num_items_in_batch, teacher_topk)
    leading = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()
    flat_labels = None if labels is None else labels.reshape(-1).long()
    denominator = _denominator(reduction, num_items_in_batch, flat_labels, ignore_index, hidden.shape[0],
                               hidden.device)
    loss, *_ = ops.fused_linear_distillation(
        hidden, student_weight, teacher, teacher_weight.detach(), flat_labels, student_bias,
        None if teacher_bias is None else teacher_bias.detach(), float(beta), float(temperature), float(alpha),
        bool(scale_by_t2), int(ignore_index), int(teacher_topk or 0), denominator, reduction == "none",
        student_hidden.requires_grad,
        student_weight.requires_grad, student_bias is not None and student_bias.requires_grad)
    return loss.reshape(leading) if reduction == "none" else loss


def _check_gathered(**tensors) -> None:
    """A DTensor here is an FSDP2 shard read outside its module's forward: refuse it rather than compute on it."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.tensor import DTensor

    for name, t in tensors.items():
        if isinstance(t, DTensor):
            raise ValueError(f"{name} is a sharded DTensor (an FSDP2 parameter read outside its module's forward): "
                             "gather it first (FSDP2: the owning module's unshard())")


def _check_head(hidden, weight, labels, bias, ignore_index) -> None:
    _check_gathered(hidden=hidden, weight=weight, bias=bias)
    for name, t in (("hidden", hidden), ("weight", weight)):
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"weight must be (vocab, {hidden.shape[-1]}) for hidden of last dim {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    _check_labels_meta(labels, hidden.shape[:-1])
    if bias is not None and (not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],)):
        raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(getattr(bias, 'shape', ()))}")
    if not isinstance(ignore_index, numbers.Integral) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__} {ignore_index!r}")
    devices = {t.device for t in (hidden, weight, labels, bias) if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


class LogProbs(NamedTuple):
    """fused_linear_logprobs' outputs, each shaped like labels: logprob, entropy (None unless asked), top (the
    token's largest log-probability, not differentiable; logprob >= top says the label is a most likely token)."""

    logprob: Tensor
    entropy: Tensor | None
    top: Tensor


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                          ignore_index: int = -100, entropy: bool = False, details: bool = False):
    """log softmax(hidden @ weight^T + bias)[label] per token for hidden (..., H), weight (V, H), integer labels
    (...), without the (tokens, V) logits (fastft::fused_linear_logprobs); with entropy=True also each token's
    entropy -sum p log p. Returns a tensor shaped like labels, or (entropy=True) the pair (logprob, entropy), or
    (details=True) a LogProbs. fp32 (fp64 for fp64 inputs); tokens
    labelled ignore_index get 0 and cost no matmul. Differentiable in hidden, weight and bias (and through the
    entropy); under torch.no_grad nothing is kept for backward. With a frozen head (weight and bias without
    gradient: LoRA, QLoRA, a reference model), the forward also takes each token's d logprob / d hidden (tokens x H,
    in the log-probabilities' dtype), so that a loss on the log-probabilities backpropagates without a head GEMM
    (two head GEMMs in all instead of three); a gradient through the entropy recomputes. labels are used as given:
    for a causal LM's next token, shift them first (labels[..., 1:] against hidden[..., :-1, :]). labels must lie
    in [0, V) or equal ignore_index."""
    _check_head(hidden, weight, labels, bias, ignore_index)
    for name, value in (("entropy", entropy), ("details", details)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    rows = hidden.reshape(-1, hidden.shape[-1])
    # a frozen head (no gradient for weight nor bias): the hidden states' gradient is taken in the forward pass
    frozen_head = not weight.requires_grad and not (bias is not None and bias.requires_grad)
    logprob, ent, top, _ = logprob_ops.fused_linear_logprobs(
        rows, weight, bias, labels.reshape(-1).long(), int(ignore_index), entropy,
        torch.is_grad_enabled() and rows.requires_grad and frozen_head)
    if details:
        return LogProbs(logprob.reshape(labels.shape), ent.reshape(labels.shape) if entropy else None,
                        top.reshape(labels.shape))
    if entropy:
        return logprob.reshape(labels.shape), ent.reshape(labels.shape)
    return logprob.reshape(labels.shape)


@dataclass
class PolicyGradientTerms:
    """A token-local policy-gradient loss on the log-probabilities (fastft/ops/policy_logprobs.py has the formulas):
    sum over tokens of token_weight * policy(logprob) + kl_weight * k3 KL(logprob, ref_logprob) - entropy_weight *
    entropy, with the ratio r = exp(logprob - old_logprob) (None: on-policy, r = 1 in value). Tensors are shaped like
    the labels (a token's normalizer and mask go into its weights); loss_type "clip" (PPO / GRPO: clamp to
    [1 - epsilon_low, 1 + epsilon_high], the ratio capped at delta when given), "cispo" or "sapo"."""

    advantage: Tensor
    token_weight: Tensor
    old_logprob: Tensor | None = None
    kl_weight: Tensor | None = None
    ref_logprob: Tensor | None = None
    entropy_weight: Tensor | None = None
    loss_type: str = "clip"
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    delta: float | None = None
    kl_bias_correction: bool = True
    sapo_temperature_pos: float = 1.0
    sapo_temperature_neg: float = 1.05


_POLICY_TENSORS = ("advantage", "token_weight", "old_logprob", "kl_weight", "ref_logprob", "entropy_weight")


def fused_linear_policy_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, terms: PolicyGradientTerms, *,
                                 bias: Tensor | None = None, ignore_index: int = -100,
                                 entropy: bool = False) -> LogProbs:
    """fused_linear_logprobs(..., details=True) for a loss that is `terms` of its log-probabilities (and entropies):
    when autograd records the call, the gradients for hidden, weight and bias are taken in this forward pass over
    each chunk's logits (fastft::fused_linear_policy_logprobs), and the backward hands them over when the incoming
    gradient is the loss's (times any constant); else it warns and recomputes as fused_linear_logprobs does. Compute
    the loss from the returned log-probabilities in plain torch (fastft.methods.grpo does)."""
    _check_head(hidden, weight, labels, bias, ignore_index)
    if not isinstance(terms, PolicyGradientTerms):
        raise TypeError(f"terms must be a PolicyGradientTerms, got {type(terms).__name__}")
    if not isinstance(entropy, bool):
        raise TypeError(f"entropy must be a bool, got {type(entropy).__name__} {entropy!r}")
    for name in _POLICY_TENSORS:
        value = getattr(terms, name)
        if value is None and name in ("advantage", "token_weight"):
            raise ValueError(f"terms.{name} is required")
        if value is not None and (not isinstance(value, Tensor) or value.shape != labels.shape):
            raise ValueError(f"terms.{name} must be a tensor shaped like labels {tuple(labels.shape)}, got "
                             f"{tuple(getattr(value, 'shape', ())) or type(value).__name__}")
        if value is not None and value.device != labels.device:
            raise ValueError(f"terms.{name} must be on labels' device {labels.device}, got {value.device}")
    if terms.loss_type not in policy_ops.POLICY_LOSS_TYPES:
        raise ValueError(f"terms.loss_type must be one of {policy_ops.POLICY_LOSS_TYPES}, got {terms.loss_type!r}")
    if (terms.kl_weight is None) != (terms.ref_logprob is None):
        raise ValueError("terms.kl_weight and terms.ref_logprob go together: pass both or neither")
    if terms.delta is not None and not (_is_real(terms.delta) and terms.delta > 0):
        raise ValueError(f"terms.delta must be None or a number > 0, got {terms.delta!r}")
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    wants = (rows.requires_grad, weight.requires_grad, bias is not None and bias.requires_grad)
    if not (torch.is_grad_enabled() and any(wants)):  # nothing to differentiate: the plain forward
        logprob, ent, top, _ = logprob_ops.fused_linear_logprobs(rows, weight, bias, flat_labels, int(ignore_index),
                                                                 entropy)
    else:
        flat = {name: None if getattr(terms, name) is None else getattr(terms, name).detach().reshape(-1)
                for name in _POLICY_TENSORS}
        delta = math.inf if terms.delta is None else float(terms.delta)
        logprob, ent, top, *_ = policy_ops.fused_linear_policy_logprobs(
            rows, weight, bias, flat_labels, int(ignore_index), entropy, flat["old_logprob"], flat["advantage"],
            flat["token_weight"], flat["kl_weight"], flat["ref_logprob"], flat["entropy_weight"], terms.loss_type,
            float(terms.epsilon_low), float(terms.epsilon_high), delta, bool(terms.kl_bias_correction),
            float(terms.sapo_temperature_pos), float(terms.sapo_temperature_neg), *wants)
    return LogProbs(logprob.reshape(labels.shape), ent.reshape(labels.shape) if entropy else None,
                    top.reshape(labels.shape))


def fused_linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, *, bias: Tensor | None = None,
                               ignore_index: int = -100, reduction: str = "mean",
                               num_items_in_batch: int | Tensor | None = None) -> Tensor:
    """F.cross_entropy(hidden @ weight^T + bias, labels) for hidden (..., H), weight (V, H), integer labels (...),
    without the (tokens, V) logits: -fused_linear_logprobs, reduced. Rows labelled ignore_index are dropped before
    the head matmul (they cost nothing); the others go in token chunks of ~32 MiB fp32 logits. With "mean" or "sum"
    the gradients for hidden (and for weight and bias when they require grad) are computed in the forward pass
    (fastft::fused_linear_nll); "none" (per token, shaped like labels) differentiates through
    fastft::fused_linear_logprobs. "mean" divides by the tokens not labelled ignore_index, or by num_items_in_batch
    (transformers' sum / num_items_in_batch). The loss is fp32 (fp64 for fp64 inputs); bf16/fp16 logits are
    accumulated in fp32. labels must lie in [0, V) or equal ignore_index; num_items_in_batch must be None, a finite
    number > 0 or a one-element tensor holding one (the values of both are checked as the module doc says).

    Row i of hidden is scored against labels[i] as given: no shift. A causal LM's loss (what its forward returns
    for labels=input_ids) predicts token t+1 from position t, so the caller shifts, as transformers does:

        hidden = model.model(input_ids).last_hidden_state                  # (B, T, H)
        loss = fused_linear_cross_entropy(hidden[:, :-1], model.lm_head.weight, input_ids[:, 1:])
        # equal to model(input_ids, labels=input_ids).loss (fastft.patch(model, fused_loss=True) does this)
    """
    _check_head(hidden, weight, labels, bias, ignore_index)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    _check_num_items_in_batch(num_items_in_batch, reduction)
    if reduction == "none":
        return -fused_linear_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index)
    rows = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1).long()
    denominator = _denominator(reduction, num_items_in_batch, flat_labels, ignore_index, rows.shape[0], rows.device)
    loss, *_ = logprob_ops.fused_linear_nll(
        rows, weight, bias, flat_labels, int(ignore_index), denominator, hidden.requires_grad, weight.requires_grad,
        bias is not None and bias.requires_grad)
    return loss
