"""torch.library ops of per-sample routed LoRA (formula: fastft/reference/routed_lora.py): one batch mixing
tasks, each row through its task's adapter, in one call.

- fastft::routed_lora(x, lora_As, lora_Bs, scales, route) -> delta (M, N): the rows grouped by adapter inside the
  op (one stable sort of the route, one gather of x), two rank-r GEMMs per adapter on its contiguous block, one
  scatter of the result. Saved for backward: x and the route (M int64); the rank-r products are recomputed.
- fastft::routed_lora_backward(dy, x, lora_As, lora_Bs, scales, route, want_x) -> (dx, dAs, dBs): the same grouping
  for the gradients. Plain torch (ATen GEMMs) on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastft.ops.routing import dispatch


@torch.library.custom_op("fastft::routed_lora", mutates_args=())
def routed_lora(x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float],
                route: Tensor) -> Tensor:
    return dispatch("routed_lora", x.device.type, x, lora_As, lora_Bs, scales, route)


@routed_lora.register_fake
def _(x, lora_As, lora_Bs, scales, route):
    return x.new_empty(x.shape[0], lora_Bs[0].shape[0], dtype=lora_As[0].dtype)


@torch.library.custom_op("fastft::routed_lora_backward", mutates_args=())
def routed_lora_backward(dy: Tensor, x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float],
                         route: Tensor, want_x: bool) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    dx, dAs, dBs = dispatch("routed_lora_backward", dy.device.type, dy, x, lora_As, lora_Bs, scales, route, want_x)
    return (dx if want_x else x.new_empty(0)), dAs, dBs


@routed_lora_backward.register_fake
def _(dy, x, lora_As, lora_Bs, scales, route, want_x):
    return (torch.empty_like(x) if want_x else x.new_empty(0), [torch.empty_like(A) for A in lora_As],
            [torch.empty_like(B) for B in lora_Bs])


def _setup(ctx, inputs, output):
    x, lora_As, lora_Bs, scales, route = inputs
    ctx.save_for_backward(x, route, *lora_As, *lora_Bs)
    ctx.scales, ctx.count = scales, len(lora_As)


def _backward(ctx, dy):
    x, route, *weights = ctx.saved_tensors
    As, Bs = weights[:ctx.count], weights[ctx.count:]
    want_x = bool(ctx.needs_input_grad[0])
    dx, dAs, dBs = routed_lora_backward(dy.contiguous(), x, As, Bs, ctx.scales, route, want_x)
    return (dx if want_x else None), list(dAs), list(dBs), None, None


routed_lora.register_autograd(_backward, setup_context=_setup)
