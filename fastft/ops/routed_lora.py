"""torch.library ops of per-sample routed LoRA (formula: fastft/reference/routed_lora.py): one batch mixing
tasks, each row through its task's adapter, in one call.

- fastft::routed_lora(x, lora_As, lora_Bs, scales, route) -> delta (M, N) in A's dtype: the rows grouped by
  adapter inside the op (route[m] in [-1, G), -1: no adapter, delta 0), two rank-r GEMMs per adapter on its
  contiguous block of rows, fp32 accumulation. Saved for backward: x and the route (M int64, plus the adapters'
  weights, which exist anyway); the rank-r products are recomputed.
- fastft::routed_lora_backward(dy, x, lora_As, lora_Bs, scales, route, want_x) -> (dx, dAs, dBs): the same grouping
  for the gradients (dx empty unless want_x; adapters without rows get zero gradients).
Implementations (fastft/ops/backends): CPU C++ (csrc/routed_lora.cpp: a counting sort of the route, the rows
gathered into fp32 in that order, ATen's BLAS per segment, the results written back in one pass), Triton
(kernels/routed_lora.py: one launch per pass over a table of row tiles that each belong to one adapter, rows read
and written in place through the sort order) and plain torch (the reference, and fp64 on CUDA).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastft.ops.routing import dispatch


def check_route(x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float], route: Tensor) -> None:
    """ValueError naming the argument unless there is one A, B and scale per adapter and route holds one adapter
    index in [-1, len(lora_As)) per row of x."""
    if not (len(lora_As) == len(lora_Bs) == len(scales) >= 1):
        raise ValueError(f"routed_lora: one A, one B and one scale per adapter, got {len(lora_As)}, {len(lora_Bs)}, "
                         f"{len(scales)}")
    if route.dim() != 1 or route.dtype != torch.int64 or x.dim() != 2 or route.shape[0] != x.shape[0]:
        raise ValueError(f"routed_lora: route must be a 1-D int64 tensor with one entry per row of x (x "
                         f"{tuple(x.shape)}), got {route.dtype} {tuple(route.shape)}")
    if route.numel():
        low, high = (int(v) for v in torch.aminmax(route))
        if low < -1 or high >= len(lora_As):
            raise ValueError(f"routed_lora: route values must be in [-1, {len(lora_As)}), got [{low}, {high}]")


@torch.library.custom_op("fastft::routed_lora", mutates_args=())
def routed_lora(x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float],
                route: Tensor) -> Tensor:
    check_route(x, lora_As, lora_Bs, scales, route)
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
