"""torch.library op: the fused linear log-probabilities of a policy-gradient loss, with the gradients taken in the
forward pass (formulas: fastft/reference/logprobs.py for the log-probabilities, policy_token_grad below for the
loss's derivative).

fastft::fused_linear_logprobs recomputes every chunk's logits in backward, because a loss on the log-probabilities
is only known after the last chunk. A policy-gradient loss whose terms are token-local (GRPO's clipped ratio
objectives, CISPO, SAPO, the k3 KL to a reference, an entropy bonus) has a derivative per token that depends only on
that token's log-probability and on per-token inputs known in advance:
    loss = sum_t token_weight_t * policy_t(logprob_t) + kl_weight_t * kl_t(logprob_t) - sum_t c_t * entropy_t
so each chunk's d(loss)/d(logprob) (and d/d(entropy) = entropy_weight) is known as soon as its log-probabilities are,
and the gradients for hidden / weight / bias are taken over the same logits tile: one head GEMM per chunk forward
(plus the two gradient GEMMs), none in backward.

- fastft::fused_linear_policy_logprobs(hidden, weight, bias, labels, ignore_index, want_entropy, <the loss's per-token
  inputs and constants>, want_hidden, want_weight, want_bias) -> (logprob, entropy or (0,), top, the predicted
  d(loss)/d(logprob) (N,), grad_hidden, grad_weight, grad_bias): the first three as fastft::fused_linear_logprobs
  returns them (the loss itself is computed by the caller from them, in plain torch). Saved for backward: the inputs,
  the predicted d(loss)/d(logprob) and the gradients.
- Backward compares the incoming d(loss)/d(logprob) and d(loss)/d(entropy) with the prediction (rows labelled
  ignore_index left out; a few host syncs per call): when they are c times it (elementwise within 1e-5 relative;
  c = 1 for the loss itself, another c when it is scaled), the saved gradients times c are the answer; otherwise
  (the log-probabilities went into more than the predicted loss) a warning says so and the gradients are
  recomputed as fastft::fused_linear_logprobs does (one more head GEMM per chunk). In eager
  mode the decision is taken in Python and a gradient handed over as is is not copied; a traced backward
  (torch.compile) runs it inside fastft::fused_linear_policy_logprobs_backward, whose outputs are copies.
Peak extra memory: fused_linear_logprobs's, with the gradients held from forward to backward.
"""

from __future__ import annotations

import math
import warnings
from typing import Optional

import torch
from torch import Tensor

from fastft.ops.distillation import _compute_dtype
from fastft.ops.logprobs import _check_labels, _empty, _run, fused_linear_logprobs_backward

POLICY_LOSS_TYPES = ("clip", "cispo", "sapo")
# Elementwise tolerance of the backward's comparison: fp32 rounding of the same formula evaluated in another order.
_MATCH_RTOL = 1e-5


def policy_token_grad(logprob: Tensor, old_logprob: Optional[Tensor], advantage: Tensor, token_weight: Tensor,
                      kl_weight: Optional[Tensor], ref_logprob: Optional[Tensor], loss_type: str, epsilon_low: float,
                      epsilon_high: float, delta: float, kl_bias_correction: bool, sapo_temperature_pos: float,
                      sapo_temperature_neg: float) -> Tensor:
    """d(loss)/d(logprob) per token (same shape as logprob) of token_weight * policy + kl_weight * kl, where, with the
    ratio r = exp(logprob - old_logprob) (r = 1 in value when old_logprob is None: on-policy) and advantage A:
    - "clip": policy = -min(min(r, delta) A, clamp(r, 1 - epsilon_low, 1 + epsilon_high) A) (PPO / GRPO);
    - "cispo": policy = -min(r, epsilon_high) A logprob with the ratio's factor held constant (CISPO);
    - "sapo": policy = -sigmoid(tau (r - 1)) 4 A / tau, tau = sapo_temperature_pos where A > 0, else _neg (SAPO);
    kl = exp(ref - logprob) - (ref - logprob) - 1 (k3), times r with kl_bias_correction. Derivatives as torch's
    autograd takes them: clamp passes the gradient on its closed interval, min splits it evenly on a tie."""
    x = logprob
    ratio = torch.ones_like(x) if old_logprob is None else torch.exp(x - old_logprob)
    if loss_type == "cispo":
        grad = -torch.clamp(ratio, max=epsilon_high) * advantage
    elif loss_type == "sapo":
        tau = torch.where(advantage > 0, sapo_temperature_pos, sapo_temperature_neg)
        gate = torch.sigmoid(tau * (ratio - 1))
        grad = -4 * advantage * gate * (1 - gate) * ratio
    else:
        unclipped = torch.clamp(ratio, max=delta) * advantage
        clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * advantage
        share = torch.where(unclipped < clipped, 1.0, torch.where(unclipped == clipped, 0.5, 0.0))
        passes_unclipped = (ratio <= delta).to(x.dtype)
        passes_clipped = ((ratio >= 1 - epsilon_low) & (ratio <= 1 + epsilon_high)).to(x.dtype)
        grad = -advantage * ratio * (share * passes_unclipped + (1 - share) * passes_clipped)
    grad = grad * token_weight
    if kl_weight is not None:
        d = ref_logprob - x
        dkl = 1 - torch.exp(d)
        if kl_bias_correction:
            dkl = (dkl + torch.exp(d) - d - 1) * ratio
        grad = grad + kl_weight * dkl
    return grad


class _PolicyTokenGrad:
    """policy_token_grad on the valid rows of a chunked pass (the token_grad of fastft/ops/logprobs.py's _run)."""

    def __init__(self, inputs: dict, constants: tuple, grad_entropy: Optional[Tensor]):
        self.inputs, self.constants, self.grad_entropy = inputs, constants, grad_entropy

    def select(self, index: Tensor) -> "_PolicyTokenGrad":
        pick = lambda t: None if t is None else t.index_select(0, index)  # noqa: E731
        return _PolicyTokenGrad({k: pick(v) for k, v in self.inputs.items()}, self.constants, pick(self.grad_entropy))

    def grad(self, logprob: Tensor, r0: int, r1: int) -> Tensor:
        rows = {k: None if v is None else v[r0:r1].to(logprob.dtype) for k, v in self.inputs.items()}
        return policy_token_grad(logprob, **rows, **dict(zip(_CONSTANTS, self.constants)))


_CONSTANTS = ("loss_type", "epsilon_low", "epsilon_high", "delta", "kl_bias_correction", "sapo_temperature_pos",
              "sapo_temperature_neg")


def _check_inputs(n: int, loss_type: str, **tensors) -> None:
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {POLICY_LOSS_TYPES}, got {loss_type!r}")
    for name, value in tensors.items():
        if value is not None and tuple(value.shape) != (n,):
            raise ValueError(f"{name} must be ({n},): one value per row of hidden, got {tuple(value.shape)}")
    if (tensors["kl_weight"] is None) != (tensors["ref_logprob"] is None):
        raise ValueError("kl_weight and ref_logprob go together: pass both or neither")


@torch.library.custom_op("fastft::fused_linear_policy_logprobs", mutates_args=())
def fused_linear_policy_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                                 ignore_index: int, want_entropy: bool, old_logprob: Optional[Tensor],
                                 advantage: Tensor, token_weight: Tensor, kl_weight: Optional[Tensor],
                                 ref_logprob: Optional[Tensor], entropy_weight: Optional[Tensor], loss_type: str,
                                 epsilon_low: float, epsilon_high: float, delta: float, kl_bias_correction: bool,
                                 sapo_temperature_pos: float, sapo_temperature_neg: float, want_hidden: bool,
                                 want_weight: bool, want_bias: bool
                                 ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    _check_labels(labels, weight.shape[0], ignore_index)
    inputs = {"old_logprob": old_logprob, "advantage": advantage, "token_weight": token_weight,
              "kl_weight": kl_weight, "ref_logprob": ref_logprob}
    _check_inputs(hidden.shape[0], loss_type, entropy_weight=entropy_weight, **inputs)
    constants = (loss_type, epsilon_low, epsilon_high, delta, kl_bias_correction, sapo_temperature_pos,
                 sapo_temperature_neg)
    dtype = _compute_dtype(hidden, weight)
    token_grad = _PolicyTokenGrad(inputs, constants, None if entropy_weight is None else entropy_weight.to(dtype))
    out = _run(hidden, weight, bias, labels, ignore_index, want_entropy, None, None, want_hidden, want_weight,
               want_bias, token_grad)
    return (out.logprob, _empty(out.logprob) if out.entropy is None else out.entropy, out.top, out.grad_logprob,
            _empty(hidden) if out.grad_hidden is None else out.grad_hidden,
            _empty(weight) if out.grad_weight is None else out.grad_weight.to(weight.dtype),
            _empty(hidden) if out.grad_bias is None else out.grad_bias.to(bias.dtype))


@fused_linear_policy_logprobs.register_fake
def _(hidden, weight, bias, labels, ignore_index, want_entropy, old_logprob, advantage, token_weight, kl_weight,
      ref_logprob, entropy_weight, loss_type, epsilon_low, epsilon_high, delta, kl_bias_correction,
      sapo_temperature_pos, sapo_temperature_neg, want_hidden, want_weight, want_bias):
    dtype = _compute_dtype(hidden, weight)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n if want_entropy else 0, dtype=dtype),
            hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, dtype=dtype),
            hidden.new_empty(hidden.shape if want_hidden else 0),
            weight.new_empty(weight.shape if want_weight else 0),
            hidden.new_empty(bias.shape if want_bias else 0))


def _setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index = inputs[:5]
    ctx.save_for_backward(hidden, weight, bias, labels, inputs[11], *output[3:])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(*output[2:])
    ctx.set_materialize_grads(False)


def _match(incoming: Optional[Tensor], predicted: Optional[Tensor], scale: float) -> bool:
    """Whether incoming == scale * predicted elementwise within _MATCH_RTOL of the larger (None stands for zeros)."""
    if incoming is None:
        return predicted is None or scale == 0.0 or not bool(predicted.any())
    if predicted is None:
        return not bool(incoming.any())
    if not incoming.numel():
        return True
    expected = predicted.to(incoming.dtype) * scale
    floor = _MATCH_RTOL * 1e-3 * float(incoming.abs().max())  # tokens far below the largest: absolute slack
    bound = _MATCH_RTOL * torch.maximum(incoming.abs(), expected.abs()) + floor
    return bool(((incoming - expected).abs() <= bound).all())


def _scale(grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor], predicted: Tensor,
           entropy_weight: Optional[Tensor]) -> Optional[float]:
    """c with (grad_logprob, grad_entropy) == c * (predicted, entropy_weight), or None when there is none."""
    for incoming, pred in ((grad_logprob, predicted), (grad_entropy, entropy_weight)):
        if incoming is not None and pred is not None and bool(pred.any()):
            k = int(pred.abs().argmax())
            scale = float(incoming[k]) / float(pred[k])
            break
    else:
        scale = 0.0
    candidates = (1.0, scale) if math.isclose(scale, 1.0, rel_tol=10 * _MATCH_RTOL) else (scale,)
    for c in candidates:
        if _match(grad_logprob, predicted, c) and _match(grad_entropy, entropy_weight, c):
            return c
    return None


def _hand_over_or_recompute(grad_logprob, grad_entropy, predicted, entropy_weight, grads, hidden, weight, bias,
                            labels, ignore_index, wants) -> list[Tensor]:
    """The saved gradients times c when the incoming ones are c times the predicted ones (the saved tensors
    themselves when c = 1), else (with a warning) the gradients recomputed from the inputs."""
    scale = _scale(grad_logprob, grad_entropy, predicted, entropy_weight)
    if scale is not None:
        return [g if scale == 1.0 or not g.numel() else g * scale for g in grads]
    warnings.warn("fused_linear_policy_logprobs: the log-probabilities' incoming gradient is not the predicted "
                  "policy loss's; recomputing the head's logits for the backward", stacklevel=3)
    if grad_logprob is None:
        grad_logprob = torch.zeros_like(predicted)
    return list(fused_linear_logprobs_backward(grad_logprob, grad_entropy, hidden, weight, bias, labels, ignore_index,
                                               *wants))


@torch.library.custom_op("fastft::fused_linear_policy_logprobs_backward", mutates_args=())
def fused_linear_policy_logprobs_backward(grad_logprob: Optional[Tensor], grad_entropy: Optional[Tensor],
                                          predicted: Tensor, entropy_weight: Optional[Tensor], grad_hidden: Tensor,
                                          grad_weight: Tensor, grad_bias: Tensor, hidden: Tensor, weight: Tensor,
                                          bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                                          want_hidden: bool, want_weight: bool, want_bias: bool
                                          ) -> tuple[Tensor, Tensor, Tensor]:
    """The backward's decision as one op, for graphs (torch.compile) that cannot branch on tensor values; its
    outputs are new tensors (a copy of a saved gradient handed over as is)."""
    saved = (grad_hidden, grad_weight, grad_bias)
    grads = _hand_over_or_recompute(grad_logprob, grad_entropy, predicted, entropy_weight, saved, hidden, weight,
                                    bias, labels, ignore_index, (want_hidden, want_weight, want_bias))
    return tuple(g.clone() if any(g is t for t in saved) else g for g in grads)


@fused_linear_policy_logprobs_backward.register_fake
def _(grad_logprob, grad_entropy, predicted, entropy_weight, grad_hidden, grad_weight, grad_bias, hidden, weight,
      bias, labels, ignore_index, want_hidden, want_weight, want_bias):
    return (hidden.new_empty(hidden.shape if want_hidden else 0),
            weight.new_empty(weight.shape if want_weight else 0),
            hidden.new_empty(bias.shape if want_bias else 0))


def _backward(ctx, grad_logprob, grad_entropy, *_):
    hidden, weight, bias, labels, entropy_weight, predicted, *grads = ctx.saved_tensors
    wants = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
    if grad_entropy is not None and not grad_entropy.numel():
        grad_entropy = None
    if grad_logprob is None and grad_entropy is None:
        return (None,) * 22
    # rows labelled ignore_index take no gradient whatever comes in for them: compare the others only
    valid = labels != ctx.ignore_index
    grad_logprob, grad_entropy = (None if g is None else torch.where(valid, g, 0.0) for g in (grad_logprob,
                                                                                           grad_entropy))
    args = (grad_logprob, grad_entropy, predicted, entropy_weight, *grads, hidden, weight, bias, labels,
            ctx.ignore_index)
    if all(g is None or type(g) is torch.Tensor for g in (grad_logprob, grad_entropy)):
        # eager: decide here and hand the saved gradients over without a copy
        grads = _hand_over_or_recompute(*args[:4], grads, *args[7:], wants)
    else:  # traced (torch.compile, AOT autograd): the decision runs inside the op
        grads = fused_linear_policy_logprobs_backward(*args, *wants)
    grad_hidden, grad_weight, grad_bias = (g if want else None for g, want in zip(grads, wants))
    return (grad_hidden, grad_weight, grad_bias) + (None,) * 19


fused_linear_policy_logprobs.register_autograd(_backward, setup_context=_setup)
