"""Plain-torch ground truth of the fused linear log-probability op.

For hidden states h (N, H), a head W (V, H) (+ bias b) and labels y (N,), with z = h W^T + b:
    logprob_i = z_i[y_i] - logsumexp(z_i)            entropy_i = -sum_j p_ij log p_ij,  p_i = softmax(z_i)
Rows labelled ignore_index get logprob 0 and entropy 0 and contribute to no gradient.
Gradient with respect to the logits of a row, for incoming gradients g (of the logprob) and e (of the entropy):
    dz = g (onehot(y) - p) - e p (log p + entropy)
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def fused_linear_logprobs_ref(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                              ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """(logprob, entropy, top: the largest log-probability of the row) per row, each (N,), on materialized logits in the inputs' dtype upcast to fp32 (fp64
    stays fp64); differentiable through torch autograd."""
    dtype = torch.float64 if hidden.dtype == torch.float64 or weight.dtype == torch.float64 else torch.float32
    logits = F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
    log_p = F.log_softmax(logits, dim=-1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    logprob = torch.where(valid, log_p.gather(1, safe.unsqueeze(1)).squeeze(1), 0.0)
    entropy = torch.where(valid, -(log_p.exp() * log_p).sum(-1), 0.0)
    top = torch.where(valid, log_p.max(dim=-1).values, 0.0)
    return logprob, entropy, top


def logprob_rows_ref(z: Tensor, labels: Tensor, want_entropy: bool, grad_logprob: Optional[Tensor],
                     grad_entropy: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor], Tensor]:
    """The per-row step on a logits tile z (rows, V) whose labels are all in [0, V): (logprob (rows,), entropy
    (rows,) or None, top (rows,): the row's largest log-probability); with grad_logprob (rows,) (and grad_entropy (rows,) or None) z is overwritten by dz above."""
    log_p = F.log_softmax(z, dim=-1)
    logprob = log_p.gather(1, labels.unsqueeze(1)).squeeze(1)
    top = log_p.max(dim=-1).values
    p = log_p.exp()
    entropy = -(p * log_p).sum(-1) if want_entropy or grad_entropy is not None else None
    if grad_logprob is not None:
        dz = -p * grad_logprob.unsqueeze(1)
        if grad_entropy is not None:
            dz -= grad_entropy.unsqueeze(1) * p * (log_p + entropy.unsqueeze(1))
        dz.scatter_add_(1, labels.unsqueeze(1), grad_logprob.unsqueeze(1).to(dz.dtype))
        z.copy_(dz)
    return logprob, (entropy if want_entropy else None), top
