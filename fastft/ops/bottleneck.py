"""torch.library op of the bottleneck adapter (formula: fastft/reference/bottleneck.py).

fastft::bottleneck_adapter(x, w_down, b_down, w_up, b_up, activation, scale, residual, ln_weight, ln_bias,
layer_norm, ln_eps) -> (out, z, mean, rstd); callers use out. z is the pre-activation down(norm(x)) (tokens, r),
mean and rstd the LayerNorm statistics (empty without the norm); they are outputs so autograd can save them.

Forward, CPU fp32 (`fastft._C.bottleneck_adapter`): the down-projection over blocks of 48 rows, the activation,
then the up-projection with the residual add in the GEMM's epilogue, so the (tokens, hidden) product is never
written and read back (one read of the residual, one write of the output). CUDA: Triton kernels with the
bias + activation in the down-projection's epilogue and the residual in the up-projection's. Other dtypes: ATen
ops. fastft::bottleneck_backward computes every gradient of the bottleneck; on CPU fp32 in one pass over row blocks
that reads dy and x from memory once and writes dx once. The CPU kernels take bottlenecks up to 64 wide and at
least 1024 tokens; other shapes run ATen's GEMMs, which are as fast there (csrc/bottleneck.cpp says why).
Backward recomputes a = act(z) (and norm(x) from x, mean, rstd):
    dW_up = s dy^T a,  db_up = s sum dy,  dz = s (dy W_up) * act'(z),  dW_down = dz^T norm(x),  db_down = sum dz,
    dx = dy (sequential adapter) + norm'(dz W_down),  d residual = dy (parallel adapter).
Saved for backward: x (the layer's hidden states, which the surrounding model holds anyway), z (r * itemsize
bytes per token) and, with the norm, mean and rstd (8 bytes per token). Plain torch saves z and act(z) (twice as
many bottleneck bytes) plus, with a LayerNorm, the normalized x (hidden * itemsize bytes per token).
Inputs (check_inputs, on metadata only, in the op and its fake): x and residual floating tensors of any
floating dtypes; the parameters floating tensors of one dtype; all on one device.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.formats.bottleneck import ACTIVATIONS, check_activation
from fastft.ops.routing import dispatch

__all__ = ["ACTIVATIONS", "bottleneck_adapter", "bottleneck_backward", "check_activation", "check_inputs"]


def check_inputs(x, residual, parameters: dict, x_name: str = "x") -> None:
    """TypeError unless x (called x_name in the message), residual (when given) and the parameters
    ({name: tensor or None}) are floating tensors, the parameters of one dtype; ValueError naming the argument and
    both devices unless they are all on x's device. Reads only metadata: free under torch.compile."""
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{x_name} must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if residual is not None and (not isinstance(residual, Tensor) or not residual.is_floating_point()):
        raise TypeError(f"residual must be None or a floating tensor, got "
                        f"{getattr(residual, 'dtype', type(residual).__name__)}")
    given = {name: t for name, t in parameters.items() if t is not None}
    for name, t in given.items():
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {getattr(t, 'dtype', type(t).__name__)}")
    dtypes = {t.dtype for t in given.values()}
    if len(dtypes) > 1:
        raise TypeError("the adapter's parameters must share one dtype, got "
                        + ", ".join(f"{name} {t.dtype}" for name, t in given.items()))
    if residual is not None and residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but {x_name} is on {x.device}: they must be on one device")
    for name, t in given.items():
        if t.device != x.device:
            raise ValueError(f"{x_name} is on {x.device} but the adapter's parameter {name} is on {t.device}: move the "
                             f"input or the adapter so that they are on one device")


def _parameters(w_down, b_down, w_up, b_up, ln_weight, ln_bias) -> dict:
    return {"w_down": w_down, "b_down": b_down, "w_up": w_up, "b_up": b_up, "ln_weight": ln_weight, "ln_bias": ln_bias}


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def _normalized(v: Tensor, ln_weight, ln_bias, layer_norm: bool, ln_eps: float):
    if not layer_norm:
        return v, v.new_empty(0), v.new_empty(0)  # no statistics without the norm
    out, mean, rstd = torch.native_layer_norm(v, (v.shape[-1],), ln_weight, ln_bias, ln_eps)
    return out, mean, rstd


@torch.library.custom_op("fastft::bottleneck_backward", mutates_args=())
def bottleneck_backward(dy: Tensor, v: Tensor, z: Tensor, w_down: Tensor, w_up: Tensor, activation: str, scale: float,
                        add_dy: bool, need_dv: bool, need_weights: bool
                        ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dv, dW_down, db_down, dW_up, db_up) of the bottleneck for the output gradient dy (tokens, hidden), the
    down-projection's input v (tokens, hidden) and its pre-activation z (tokens, r); all share one dtype.
    dv = [dy +] dz W_down with dz = act'(z) * scale * (dy W_up), the dy term for a sequential adapter without a norm
    (its input is its residual); dv is empty unless need_dv, the weight gradients empty unless need_weights.
    CPU fp32 (fastft._C): one pass over blocks of rows, reading dy and v from memory once and writing dv once
    (bottlenecks up to 64 wide and at least 1024 tokens; ATen's GEMMs otherwise); CUDA: Triton with act' and dy in
    the GEMM epilogues, cuBLAS for the weight gradients."""
    return dispatch("bottleneck_backward", dy.device.type, dy, v, z, w_down, w_up, activation, scale, add_dy, need_dv,
                    need_weights)


@bottleneck_backward.register_fake
def _(dy, v, z, w_down, w_up, activation, scale, add_dy, need_dv, need_weights):
    dv = dy.new_empty(dy.shape) if need_dv else dy.new_empty(0)
    if not need_weights:
        return dv, *(dy.new_empty(0) for _ in range(4))
    return dv, w_down.new_empty(w_down.shape), w_down.new_empty(w_down.shape[0]), w_up.new_empty(w_up.shape), \
        w_up.new_empty(w_up.shape[0])


@torch.library.custom_op("fastft::bottleneck_adapter", mutates_args=())
def bottleneck_adapter(x: Tensor, w_down: Tensor, b_down: Optional[Tensor], w_up: Tensor, b_up: Optional[Tensor],
                       activation: str, scale: float, residual: Optional[Tensor], ln_weight: Optional[Tensor],
                       ln_bias: Optional[Tensor], layer_norm: bool, ln_eps: float
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_activation(activation)
    check_inputs(x, residual, _parameters(w_down, b_down, w_up, b_up, ln_weight, ln_bias))
    rows = _rows(x)
    base = rows if residual is None else _rows(residual)
    v, mean, rstd = _normalized(rows.to(w_down.dtype), ln_weight, ln_bias, layer_norm, ln_eps)
    out, z = dispatch("bottleneck_adapter", x.device.type, v, base, w_down, b_down, w_up, b_up, activation, scale)
    return out.reshape(x.shape), z, mean, rstd


@bottleneck_adapter.register_fake
def _(x, w_down, b_down, w_up, b_up, activation, scale, residual, ln_weight, ln_bias, layer_norm, ln_eps):
    check_inputs(x, residual, _parameters(w_down, b_down, w_up, b_up, ln_weight, ln_bias))
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    base = x if residual is None else residual
    stats_shape = (rows, 1) if layer_norm else (0,)
    return (torch.empty_like(base, memory_format=torch.contiguous_format).reshape(x.shape),
            x.new_empty(rows, w_down.shape[0], dtype=w_down.dtype),
            x.new_empty(stats_shape, dtype=w_down.dtype), x.new_empty(stats_shape, dtype=w_down.dtype))


def _setup_context(ctx, inputs, output):
    x, w_down, b_down, w_up, b_up, activation, scale, residual, ln_weight, ln_bias, layer_norm, ln_eps = inputs
    _, z, mean, rstd = output
    ctx.save_for_backward(x, w_down, w_up, ln_weight, ln_bias, z, mean, rstd)
    ctx.activation, ctx.scale, ctx.layer_norm, ctx.ln_eps = activation, scale, layer_norm, ln_eps
    ctx.has_residual = residual is not None
    ctx.has_b_down, ctx.has_b_up = b_down is not None, b_up is not None


def _backward(ctx, grad_out, _grad_z, _grad_mean, _grad_rstd):
    x, w_down, w_up, ln_weight, ln_bias, z, mean, rstd = ctx.saved_tensors
    needs = ctx.needs_input_grad
    dy = _rows(grad_out)
    grad_w_up = grad_b_up = grad_w_down = grad_b_down = grad_x = grad_residual = grad_ln_w = grad_ln_b = None
    need_input = needs[0] or needs[8] or needs[9]
    need_weights = any(needs[1:5])
    if need_input or need_weights:
        v = _rows(x).to(w_down.dtype)
        normalized = _normalized(v, ln_weight, ln_bias, True, ctx.ln_eps)[0] if ctx.layer_norm and need_weights else v
        add_dy = not ctx.has_residual and not ctx.layer_norm
        grad_v, grad_w_down, grad_b_down, grad_w_up, grad_b_up = bottleneck_backward(
            dy.to(w_up.dtype), normalized, z, w_down, w_up, ctx.activation, ctx.scale, add_dy and need_input,
            need_input, need_weights)
        if need_input:
            if ctx.layer_norm:
                grad_v, grad_ln_w, grad_ln_b = torch.ops.aten.native_layer_norm_backward(
                    grad_v, v, (v.shape[-1],), mean, rstd, ln_weight, ln_bias, [True, needs[8], needs[9]])
            grad_rows = grad_v.to(x.dtype)
            if not ctx.has_residual and not add_dy:
                grad_rows = grad_rows + dy
            grad_x = grad_rows.reshape(x.shape) if needs[0] else None
        grad_w_down, grad_w_up = (grad_w_down if needs[1] else None), (grad_w_up if needs[3] else None)
        grad_b_down = grad_b_down if ctx.has_b_down and needs[2] else None
        grad_b_up = grad_b_up if ctx.has_b_up and needs[4] else None
    if ctx.has_residual and needs[7]:
        grad_residual = grad_out
    return (grad_x, grad_w_down, grad_b_down, grad_w_up, grad_b_up, None, None, grad_residual, grad_ln_w,
            grad_ln_b, None, None)


bottleneck_adapter.register_autograd(_backward, setup_context=_setup_context)
