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


def generalized_jsd_ref(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    """Per-row generalized JSD of logits already divided by the temperature (summed over the last dim)."""
    s_logp = F.log_softmax(student_logits, dim=-1)
    t_logp = F.log_softmax(teacher_logits, dim=-1)
    if beta == 0.0:
        return F.kl_div(s_logp, t_logp, reduction="none", log_target=True).sum(-1)
    if beta == 1.0:
        return F.kl_div(t_logp, s_logp, reduction="none", log_target=True).sum(-1)
    log_m = torch.logsumexp(torch.stack([s_logp + math.log(1 - beta), t_logp + math.log(beta)]), dim=0)
    kl_teacher = F.kl_div(log_m, t_logp, reduction="none", log_target=True).sum(-1)
    kl_student = F.kl_div(log_m, s_logp, reduction="none", log_target=True).sum(-1)
    return beta * kl_teacher + (1 - beta) * kl_student


def topk_bucket_logprobs(student_logits: Tensor, teacher_logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(student, teacher) log-probabilities over the teacher's top-k tokens plus a last 'rest' bucket."""
    s_logp = F.log_softmax(student_logits, dim=-1)
    t_logp = F.log_softmax(teacher_logits, dim=-1)
    top = teacher_logits.topk(k, dim=-1).indices
    rest = torch.ones_like(s_logp, dtype=torch.bool).scatter_(-1, top, False)

    def bucketed(logp):
        rest_mass = torch.logsumexp(logp.masked_fill(~rest, float("-inf")), dim=-1, keepdim=True)
        return torch.cat([logp.gather(-1, top), rest_mass], dim=-1)

    return bucketed(s_logp), bucketed(t_logp)


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
