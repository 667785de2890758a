"""Modules of domain-adversarial training: gradient reversal and a domain classifier on pooled hidden states."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastft.domain import grad_reverse


class GradientReversal(nn.Module):
    """x forward, -lam * dy backward; `lam` may change between calls (a DANN schedule)."""

    def __init__(self, lam: float = 1.0):
        super().__init__()
        self.lam = lam

    def forward(self, x: Tensor) -> Tensor:
        return grad_reverse(x, self.lam)


def mean_pool(hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
    """(batch, seq, hidden) -> (batch, hidden): the mean over the positions the mask keeps (all without one)."""
    if attention_mask is None:
        return hidden.mean(1)
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(f"attention_mask must be (batch, seq) = {tuple(hidden.shape[:2])}, "
                         f"got {tuple(attention_mask.shape)}")
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


class DomainClassifier(nn.Module):
    """Domain logits from hidden states: mean-pooled over the attention mask, through gradient reversal (strength
    `lam`, set per step), then Linear -> ReLU -> Linear to `num_domains` logits."""

    def __init__(self, hidden_size: int, num_domains: int = 2, width: int = 256, lam: float = 1.0,
                 dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if num_domains < 2:
            raise ValueError(f"num_domains must be >= 2, got {num_domains}")
        self.reversal = GradientReversal(lam)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, width, dtype=dtype, device=device), nn.ReLU(),
                                 nn.Linear(width, num_domains, dtype=dtype, device=device))

    def forward(self, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        pooled = mean_pool(hidden, attention_mask)
        return self.mlp(self.reversal(pooled).to(self.mlp[0].weight.dtype))
