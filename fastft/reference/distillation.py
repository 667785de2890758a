"""Plain-torch ground truth of the distillation loss: TRL's generalized JSD and Hinton's KD on materialized logits.

soft term per token: generalized JSD(beta) between teacher P = softmax(t / T) and student Q = softmax(s / T),
    beta = 0: KL(P || Q) exactly; beta = 1: KL(Q || P) exactly; else beta KL(P || M) + (1 - beta) KL(Q || M),
    M = beta P + (1 - beta) Q; times T^2 when scale_by_t2.
loss per token = alpha * soft + (1 - alpha) * CE(s at T = 1, label); tokens labelled ignore_index count in neither.

teacher_topk = k (an approximation): the soft term compares the two distributions restricted to the teacher's k
most likely tokens plus one bucket holding the rest of each distribution's mass (k + 1 categories).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def jsd_from_logprobs(s_logp: Tensor, t_logp: Tensor, beta: float, want_grad: bool = False):
    """(generalized JSD(beta) per row between distributions given as log-probabilities over the last dim,
    h = dJSD/dq per category up to a per-row constant (which the softmax Jacobian removes), or None).
    beta = 0: KL(P || Q) = sum p (log p - log q), h = -p / q; beta = 1: KL(Q || P) = sum q (log q - log p),
    h = log q - log p; else beta KL(P || M) + (1 - beta) KL(Q || M) with log M = logaddexp(log(1 - beta) + log q,
    log(beta) + log p), h = (1 - beta) (log q - log M)."""
    q = s_logp.exp()
    if beta == 0.0:
        p = t_logp.exp()
        return (p * (t_logp - s_logp)).sum(-1), (-p / q if want_grad else None)
    if beta == 1.0:
        g = s_logp - t_logp
        return (q * g).sum(-1), (g if want_grad else None)
    p = t_logp.exp()
    log_m = torch.logaddexp(s_logp + math.log(1 - beta), t_logp + math.log(beta))
    soft = beta * (p * (t_logp - log_m)).sum(-1) + (1 - beta) * (q * (s_logp - log_m)).sum(-1)
    return soft, ((1 - beta) * (s_logp - log_m) if want_grad else None)


def generalized_jsd_ref(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    """Per-row generalized JSD of logits already divided by the temperature (summed over the last dim)."""
    return jsd_from_logprobs(F.log_softmax(student_logits, dim=-1), F.log_softmax(teacher_logits, dim=-1), beta)[0]


def _buckets(logp: Tensor, top: Tensor, in_top: Tensor) -> Tensor:
    """log-probabilities of the tokens `top` (rows, k) and of a last bucket holding the rest of the mass."""
    rest = torch.logsumexp(logp.masked_fill(in_top, float("-inf")), dim=-1, keepdim=True)
    return torch.cat([logp.gather(-1, top), rest], dim=-1)


def topk_bucket_logprobs(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probabilities over the teacher's top-k tokens plus a last 'rest' bucket."""
    s_logp = F.log_softmax(student_logits, dim=-1)
    t_logp = F.log_softmax(teacher_logits, dim=-1)
    top = teacher_logits.topk(k, dim=-1).indices
    in_top = torch.zeros_like(s_logp, dtype=torch.bool).scatter_(-1, top, True)
    return _buckets(s_logp, top, in_top), _buckets(t_logp, top, in_top)


def soft_rows_ref(zs: Tensor, zt: Tensor, beta: float, temperature: float, want_grad: bool, topk: int,
                  grad_scale: float) -> tuple[Tensor, Tensor | None]:
    """The row step of the fused loss: per-row soft term between student logits zs and teacher logits zt (rows,
    vocab) at temperature T (teacher top-k buckets when topk > 0) and, when want_grad, grad_scale * its gradient
    with respect to zs / T: q * (h - sum q h) for the full vocabulary, and for buckets
    q_j (h_c(j) - sum_c b_c h_c), token j's probability feeding its bucket c(j)."""
    s_logp = F.log_softmax(zs / temperature, dim=-1)
    t_logp = F.log_softmax(zt / temperature, dim=-1)
    q = s_logp.exp()
    if not topk:
        if beta == 0.0:  # KL(P || Q): gradient q - p, without forming -p / q
            p = t_logp.exp()
            soft = (p * (t_logp - s_logp)).sum(-1)
            return soft, ((q - p).mul_(grad_scale) if want_grad else None)
        soft, h = jsd_from_logprobs(s_logp, t_logp, beta, want_grad)
        return soft, (q * (h - (q * h).sum(-1, keepdim=True))).mul_(grad_scale) if want_grad else None
    top = zt.topk(topk, dim=-1).indices
    in_top = torch.zeros_like(zs, dtype=torch.bool).scatter_(-1, top, True)
    s_buckets = _buckets(s_logp, top, in_top)
    soft, h = jsd_from_logprobs(s_buckets, _buckets(t_logp, top, in_top), beta, want_grad)
    if not want_grad:
        return soft, None
    centred = h - (s_buckets.exp() * h).sum(-1, keepdim=True)
    grad = q * centred[:, -1:]
    grad.scatter_(-1, top, q.gather(-1, top) * centred[:, :-1])
    return soft, grad.mul_(grad_scale)


def distillation_ref(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, *,
                     student_bias=None, teacher_bias=None, beta=0.0, temperature=1.0, alpha=1.0, scale_by_t2=False,
                     ignore_index=-100, reduction="mean", num_items_in_batch=None, teacher_topk=None,
                     dtype=torch.float32) -> Tensor:
    """The loss from materialized logits computed in `dtype` (fp32, or fp64 as a test oracle)."""
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1]).to(dtype)
    student = F.linear(hidden, student_weight.to(dtype), None if student_bias is None else student_bias.to(dtype))
    with torch.no_grad():
        teacher = F.linear(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).to(dtype), teacher_weight.to(dtype),
                           None if teacher_bias is None else teacher_bias.to(dtype))
    if teacher_topk is None:
        soft = generalized_jsd_ref(student / temperature, teacher / temperature, beta)
    else:  # log-probabilities are their own log_softmax, so the same JSD applies to the k + 1 buckets
        soft = generalized_jsd_ref(*topk_bucket_logprobs(student / temperature, teacher / temperature, teacher_topk),
                                   beta)
    if scale_by_t2:
        soft = soft * temperature**2
    per_token = alpha * soft
    valid = torch.ones_like(per_token, dtype=torch.bool)
    if labels is not None:
        flat_labels = labels.reshape(-1)
        valid = flat_labels != ignore_index
        if alpha != 1.0:
            ce = F.cross_entropy(student, flat_labels, ignore_index=ignore_index, reduction="none")
            per_token = per_token + (1 - alpha) * ce
    per_token = torch.where(valid, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return per_token.reshape(student_hidden.shape[:-1])
    if reduction == "sum":
        return per_token.sum()
    # the mean over no counted token is 0 (a batch whose labels are all ignore_index contributes nothing)
    denominator = num_items_in_batch if num_items_in_batch is not None else valid.sum().clamp(min=1)
    return per_token.sum() / denominator
