"""torch.library ops of fake quantization (formulas and torchao parity: fastft/reference/qat.py). NaN and infinities
give torchao's results on every backend: a NaN in a group makes the group's outputs and gradients NaN.

- fastft::fake_quantize(x, bits, group, symmetric, eps): x fake-quantized over contiguous groups of `group`
  elements along the last dim, torchao's numerics bit for bit. CPU: one C++ pass per group (min/max, scale, values;
  AVX2 for fp32). CUDA: one Triton pass (kernels/qat.py).
- fastft::fake_quantize_backward(grad, x, bits, group, symmetric, eps): the straight-through gradient, zero where
  the clamp was active. The scales and the clamp mask are recomputed from x in one pass, so backward saves only x
  (itemsize bytes per element, and for a weight that is the parameter itself); torchao's autograd keeps fp32
  intermediates of x's size instead.
- fastft::fake_quantize_with_scale(x, scale, zero_point, bits, group): the same with learned fp32 qparams (zero
  point None: symmetric), torchao range learning's numerics; its backward op gives dx, d(scale) and d(zero point)
  from one pass over x and dy, saving x and the qparams only.
- fastft::fake_quant_linear(x, weight, bias, weight_bits, group, activation_bits, quantize_weight): the linear of
  a QAT layer, y = fq_a(x) @ fq_w(W)^T + b (fq_a: asymmetric per token, activation_bits > 0; fq_w: symmetric per
  group, when quantize_weight). Saves x and W only, not their fake-quantized copies: backward recomputes them
  (CPU: one pass each, then ATen GEMMs and the straight-through passes) or, on CUDA, never writes them: the Triton
  GEMMs fake-quantize tiles in their prologues from precomputed qparams and apply the straight-through masks in
  their epilogues (kernels/qat.py).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.formats.qat import GRANULARITIES, default_eps, group_length, qrange
from fastft.ops.routing import dispatch

__all__ = ["GRANULARITIES", "default_eps", "fake_quant_linear", "fake_quantize", "fake_quantize_backward",
           "fake_quantize_with_scale", "fake_quantize_with_scale_backward", "group_length", "qparams", "qrange"]


def qparams(x: Tensor, bits: int, group: int, symmetric: bool, eps: float | None = None) -> tuple[Tensor, Tensor]:
    """(scale fp32, zero_point fp32), each (x.numel() // group, 1): the dynamic qparams of each group of `group`
    consecutive elements, as fastft::fake_quantize computes them (initial scales of learned fake quantization)."""
    return dispatch("fake_quantize_qparams", x.device.type, x, bits, group, symmetric, eps)


@torch.library.custom_op("fastft::fake_quantize", mutates_args=())
def fake_quantize(x: Tensor, bits: int, group: int, symmetric: bool, eps: float) -> Tensor:
    return dispatch("fake_quantize", x.device.type, x, bits, group, symmetric, eps)


@fake_quantize.register_fake
def _(x, bits, group, symmetric, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastft::fake_quantize_backward", mutates_args=())
def fake_quantize_backward(grad: Tensor, x: Tensor, bits: int, group: int, symmetric: bool, eps: float) -> Tensor:
    return dispatch("fake_quantize_backward", x.device.type, grad, x, bits, group, symmetric, eps)


@fake_quantize_backward.register_fake
def _(grad, x, bits, group, symmetric, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    x, bits, group, symmetric, eps = inputs
    ctx.save_for_backward(x)
    ctx.options = (bits, group, symmetric, eps)


def _backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return fake_quantize_backward(grad, x, *ctx.options), None, None, None, None


fake_quantize.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("fastft::fake_quantize_with_scale", mutates_args=())
def fake_quantize_with_scale(x: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int, group: int) -> Tensor:
    """Fake quantization with given fp32 scales (numel / group of them) and, for the asymmetric form, fp32 zero
    points: learned qparams (LSQ / torchao range learning). CPU: one C++ pass; CUDA: one Triton pass."""
    return dispatch("fake_quantize_with_scale", x.device.type, x, scale, zero_point, bits, group)

@fake_quantize_with_scale.register_fake
def _(x, scale, zero_point, bits, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastft::fake_quantize_with_scale_backward", mutates_args=())
def fake_quantize_with_scale_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int,
                                      group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzero_point) of fastft::fake_quantize_with_scale (dzero_point empty without zero points);
    CPU: one C++ pass (sums in fp64); CUDA: one Triton pass (fp32 sums over each group, as torchao's autograd)."""
    dx, dscale, dzero = dispatch("fake_quantize_with_scale_backward", x.device.type, grad, x, scale, zero_point, bits,
                                 group)
    return dx.reshape(x.shape), dscale.reshape(scale.shape), dzero.reshape(zero_point.shape if zero_point is not None
                                                                           else (0,))

@fake_quantize_with_scale_backward.register_fake
def _(grad, x, scale, zero_point, bits, group):
    return (torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scale),
            torch.empty_like(zero_point) if zero_point is not None else scale.new_empty(0))


def _setup_scaled(ctx, inputs, output):
    x, scale, zero_point, bits, group = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.options = (bits, group)


def _backward_scaled(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    grad_x, grad_scale, grad_zero_point = fake_quantize_with_scale_backward(grad, x, scale, zero_point, *ctx.options)
    needs = ctx.needs_input_grad
    return (grad_x if needs[0] else None, grad_scale if needs[1] else None,
            grad_zero_point if zero_point is not None and needs[2] else None, None, None)


fake_quantize_with_scale.register_autograd(_backward_scaled, setup_context=_setup_scaled)


def quantized_input(x, activation_bits):
    """fq_a(x) per token (or x), as fastft::fake_quantize computes it."""
    if not activation_bits:
        return x
    return fake_quantize(x, activation_bits, x.shape[1], False, default_eps(x.dtype, None))


def quantized_weight(weight, weight_bits, group, quantize_weight):
    """fq_w(W) per group (or W), as fastft::fake_quantize computes it."""
    if not quantize_weight:
        return weight
    return fake_quantize(weight, weight_bits, group, True, default_eps(weight.dtype, None))


@torch.library.custom_op("fastft::fake_quant_linear", mutates_args=())
def fake_quant_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_bits: int, group: int,
                      activation_bits: int, quantize_weight: bool) -> Tensor:
    return dispatch("fake_quant_linear", x.device.type, x, weight, bias, weight_bits, group, activation_bits,
                    quantize_weight)


@fake_quant_linear.register_fake
def _(x, weight, bias, weight_bits, group, activation_bits, quantize_weight):
    return x.new_empty(x.shape[0], weight.shape[0])


def _setup_linear(ctx, inputs, output):
    x, weight, bias, *options = inputs
    ctx.save_for_backward(x, weight)
    ctx.options, ctx.has_bias = options, bias is not None


def _backward_linear(ctx, grad):
    x, weight = ctx.saved_tensors
    weight_bits, group, activation_bits, quantize_weight = ctx.options
    dy = grad.to(x.dtype).contiguous()
    want_x, want_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_x, grad_weight = dispatch("fake_quant_linear_backward", x.device.type, dy, x, weight, weight_bits, group,
                                   activation_bits, quantize_weight, want_x, want_weight)
    grad_bias = None
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = dy.sum(0)
    return grad_x, grad_weight, grad_bias, None, None, None, None


fake_quant_linear.register_autograd(_backward_linear, setup_context=_setup_linear)
