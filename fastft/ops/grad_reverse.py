"""torch.library op of gradient reversal (formula: fastft/reference/grad_reverse.py).

- fastft::grad_reverse(x, lam): x forward (a copy: a custom op may not return its input), -lam * dy backward.
  Saves nothing for backward (lam is a Python float on the context). As a custom op with a fake implementation it
  stays one node of a torch.compile graph (no graph break), where a Python autograd.Function around it would be
  traced through. Plain torch on every device: one copy forward, one scaled copy backward, nothing to fuse.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastft.ops.routing import dispatch


@torch.library.custom_op("fastft::grad_reverse", mutates_args=())
def grad_reverse(x: Tensor, lam: float) -> Tensor:
    return dispatch("grad_reverse", x.device.type, x)


@grad_reverse.register_fake
def _(x, lam):
    return torch.empty_like(x)


def _setup_context(ctx, inputs, output):
    ctx.lam = inputs[1]


def _backward(ctx, grad):
    return dispatch("grad_reverse_backward", grad.device.type, grad, ctx.lam), None


grad_reverse.register_autograd(_backward, setup_context=_setup_context)
