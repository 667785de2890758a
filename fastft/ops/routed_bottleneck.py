"""torch.library op of per-sample routed bottleneck adapters (formula: fastft/reference/routed_bottleneck.py): one
batch mixing tasks, each row through its task's adapter (sequential or parallel), in one autograd node.

fastft::routed_bottleneck(output, source, w_downs, b_downs, w_ups, b_ups, activations, scales, parallel, route)
-> out (M, H): the rows grouped by adapter inside the op (one stable sort of the route), each adapter's contiguous
block through the bottleneck kernel entries of the routing table (`bottleneck_adapter`, `bottleneck_backward`: C++
on CPU for fp32 blocks of at least 1024 rows, Triton on CUDA, ATen otherwise), one scatter of the results; rows of
route -1 pass unchanged. A block of one adapter's rows is exactly those kernels' input, so the op has no kernel of
its own: a dedicated one would only save the G - 1 extra launches per call. activations are indices into
ACTIVATIONS; a missing bias is an empty tensor; parallel[g]: adapter g reads `source` (the sublayer's input rows),
else `output`.
Saved for backward: output, source and the route (nothing per adapter: the pre-activations are recomputed, one
rank-r GEMM per block).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft.formats.bottleneck import ACTIVATIONS
from fastft.ops.routing import dispatch


def _blocks(route: Tensor, count: int) -> list[tuple[int, Tensor]]:
    """(adapter, its row indices) for every adapter with rows, from one stable sort of the route."""
    order = torch.argsort(route, stable=True)
    sizes = torch.bincount(route + 1, minlength=count + 1).tolist()
    blocks, start = [], sizes[0]
    for g, n in enumerate(sizes[1:]):
        if n:
            blocks.append((g, order[start:start + n]))
        start += n
    return blocks


def _bias(b: Tensor) -> Optional[Tensor]:
    return b if b.numel() else None  # an adapter without bias passes an empty tensor (autograd takes no None in lists)


def _inputs(output: Tensor, source: Optional[Tensor], parallel: bool, rows: Tensor, dtype: torch.dtype) -> Tensor:
    return (source if parallel else output).reshape(-1, output.shape[-1]).index_select(0, rows).to(dtype)


def check_routed(output, source, w_downs, b_downs, w_ups, b_ups, activations, scales, parallel, route) -> None:
    count = len(w_downs)
    if not count or any(len(v) != count for v in (b_downs, w_ups, b_ups, activations, scales, parallel)):
        raise ValueError("routed_bottleneck: one w_down, b_down, w_up, b_up, activation, scale and parallel flag per "
                         "adapter")
    if any(a not in range(len(ACTIVATIONS)) for a in activations):
        raise ValueError(f"routed_bottleneck: activations must be indices into {ACTIVATIONS}, got {activations}")
    if any(parallel) and (source is None or source.shape != output.shape):
        raise ValueError("routed_bottleneck: parallel adapters need source with output's shape")
    rows = output.numel() // output.shape[-1] if output.shape[-1] else 0
    if route.dim() != 1 or route.dtype != torch.int64 or route.shape[0] != rows:
        raise ValueError(f"routed_bottleneck: route must be 1-D int64 with one entry per row of output ({rows}), "
                         f"got {route.dtype} {tuple(route.shape)}")
    if route.numel():
        low, high = (int(v) for v in torch.aminmax(route))
        if low < -1 or high >= count:
            raise ValueError(f"routed_bottleneck: route values must be in [-1, {count}), got [{low}, {high}]")


@torch.library.custom_op("fastft::routed_bottleneck", mutates_args=())
def routed_bottleneck(output: Tensor, source: Optional[Tensor], w_downs: list[Tensor], b_downs: list[Tensor],
                      w_ups: list[Tensor], b_ups: list[Tensor], activations: list[int], scales: list[float],
                      parallel: list[bool], route: Tensor) -> Tensor:
    check_routed(output, source, w_downs, b_downs, w_ups, b_ups, activations, scales, parallel, route)
    rows = output.reshape(-1, output.shape[-1])
    out = rows.clone()
    for g, index in _blocks(route, len(w_downs)):
        v = _inputs(output, source, parallel[g], index, w_downs[g].dtype)
        y, _ = dispatch("bottleneck_adapter", output.device.type, v, rows.index_select(0, index), w_downs[g],
                        _bias(b_downs[g]), w_ups[g], _bias(b_ups[g]), ACTIVATIONS[activations[g]], scales[g])
        out.index_copy_(0, index, y)
    return out.reshape(output.shape)


@routed_bottleneck.register_fake
def _(output, source, w_downs, b_downs, w_ups, b_ups, activations, scales, parallel, route):
    return torch.empty_like(output, memory_format=torch.contiguous_format)


def _setup(ctx, inputs, output):
    output, source, w_downs, b_downs, w_ups, b_ups, activations, scales, parallel, route = inputs
    ctx.save_for_backward(output, source, route, *w_downs, *w_ups, *b_downs, *b_ups)
    ctx.activations, ctx.scales, ctx.parallel, ctx.count = activations, scales, parallel, len(w_downs)


def _backward(ctx, grad):
    output, source, route, *weights = ctx.saved_tensors
    w_downs, w_ups, b_downs, b_ups = (weights[i * ctx.count:(i + 1) * ctx.count] for i in range(4))
    dy = grad.reshape(-1, grad.shape[-1])
    d_output = dy.to(output.dtype).clone()  # every row's residual is its output row
    d_source = torch.zeros_like(source) if source is not None else None
    grads = {name: [None] * ctx.count for name in ("w_down", "b_down", "w_up", "b_up")}
    for g, index in _blocks(route, ctx.count):
        w_down, w_up = w_downs[g], w_ups[g]
        v = _inputs(output, source, ctx.parallel[g], index, w_down.dtype)
        z = F.linear(v, w_down, _bias(b_downs[g]))
        dv, dwd, dbd, dwu, dbu = dispatch("bottleneck_backward", dy.device.type, dy.index_select(0, index).to(
            w_down.dtype).contiguous(), v, z, w_down, w_up, ACTIVATIONS[ctx.activations[g]], ctx.scales[g], False,
            True, True)
        if ctx.parallel[g]:
            d_source.reshape(-1, source.shape[-1]).index_copy_(0, index, dv.to(source.dtype))
        else:
            d_output.index_add_(0, index, dv.to(output.dtype))
        grads["w_down"][g], grads["w_up"][g] = dwd, dwu
        grads["b_down"][g] = dbd if b_downs[g].numel() else None
        grads["b_up"][g] = dbu if b_ups[g].numel() else None
    for g in range(ctx.count):  # adapters without rows: zero gradients
        if grads["w_down"][g] is None:
            grads["w_down"][g], grads["w_up"][g] = torch.zeros_like(w_downs[g]), torch.zeros_like(w_ups[g])
            grads["b_down"][g], grads["b_up"][g] = torch.zeros_like(b_downs[g]), torch.zeros_like(b_ups[g])
    return (d_output.reshape(output.shape), d_source, grads["w_down"], grads["b_down"], grads["w_up"], grads["b_up"],
            None, None, None, None)


routed_bottleneck.register_autograd(_backward, setup_context=_setup)
