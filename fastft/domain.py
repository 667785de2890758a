"""Gradient reversal for domain-adversarial training (the op: fastft/ops/grad_reverse.py).

    features = fastft.domain.grad_reverse(pooled, lam)   # identity forward, -lam * grad backward
    lam = fastft.domain.dann_lambda(progress)            # Ganin's schedule 2 / (1 + exp(-gamma p)) - 1
"""

from __future__ import annotations

import math
import numbers

from torch import Tensor

from fastft.ops import grad_reverse as grad_reverse_ops


def _real(name: str, value, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not low <= value <= high:
        raise ValueError(f"{name} must be a finite real number in [{low}, {high}], got {value!r}")
    return float(value)


def grad_reverse(x: Tensor, lam: float = 1.0) -> Tensor:
    """x forward; the gradient -lam * dy backward (lam: a finite real number >= 0)."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return grad_reverse_ops.grad_reverse(x, _real("lam", lam, 0.0))


def dann_lambda(progress: float, gamma: float = 10.0) -> float:
    """DANN's reversal strength for training progress p in [0, 1]: 2 / (1 + exp(-gamma p)) - 1 (0 at the start,
    -> 1 at the end)."""
    p = _real("progress", progress, 0.0, 1.0)
    return 2.0 / (1.0 + math.exp(-_real("gamma", gamma, 0.0) * p)) - 1.0
