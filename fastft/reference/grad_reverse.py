"""Plain-torch ground truth of the gradient reversal layer (Ganin & Lempitsky 2015): y = x forward,
dx = -lam * dy backward."""

from __future__ import annotations

from torch import Tensor


def grad_reverse_ref(x: Tensor) -> Tensor:
    """The forward: a copy of x (a custom op may not return its input)."""
    return x.clone()


def grad_reverse_backward_ref(grad: Tensor, lam: float) -> Tensor:
    return grad * -lam
