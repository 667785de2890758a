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
import torch.nn.functional as F
from torch import Tensor

from fastft.ops.backend import backend_for, native_extension
from fastft.reference import qat as ref


def _reference(x: Tensor, bits: int, group: int, symmetric: bool, eps: float) -> Tensor:
    with torch.no_grad():
        return ref.fake_quantize_groups_ref(x, bits, group, symmetric, eps)


def _reference_backward(grad: Tensor, x: Tensor, bits: int, group: int, symmetric: bool, eps: float) -> Tensor:
    qmin, qmax = ref.qrange(bits)
    scale, zero_point = ref.qparams_ref(x, bits, group, symmetric, eps)
    inv = 1.0 / scale
    pre = torch.round(x.reshape(-1, group) * inv) + zero_point
    passed = torch.where((pre >= qmin) & (pre <= qmax), (grad.reshape(-1, group) * scale).to(x.dtype), 0.0)
    # masked, then times 1 / scale, as torchao's autograd: a NaN scale makes every gradient of its group NaN
    return (passed * inv).reshape(x.shape).to(x.dtype)


@torch.library.custom_op("fastft::fake_quantize", mutates_args=())
def fake_quantize(x: Tensor, bits: int, group: int, symmetric: bool, eps: float) -> Tensor:
    return _reference(x, bits, group, symmetric, eps)


@fake_quantize.register_kernel(("cpu", "cuda"))
def _(x, bits, group, symmetric, eps):
    backend = backend_for(x.device.type)
    qmin, qmax = ref.qrange(bits)
    if backend == "native":
        return native_extension().fake_quantize(x, group, qmin, qmax, symmetric, eps).reshape(x.shape)
    if backend == "triton":
        from fastft.kernels import qat as kernels

        return kernels.fake_quantize(x, group, qmin, qmax, symmetric, eps)
    return _reference(x, bits, group, symmetric, eps)


@fake_quantize.register_fake
def _(x, bits, group, symmetric, eps):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastft::fake_quantize_backward", mutates_args=())
def fake_quantize_backward(grad: Tensor, x: Tensor, bits: int, group: int, symmetric: bool, eps: float) -> Tensor:
    return _reference_backward(grad, x, bits, group, symmetric, eps)


@fake_quantize_backward.register_kernel(("cpu", "cuda"))
def _(grad, x, bits, group, symmetric, eps):
    backend = backend_for(x.device.type)
    qmin, qmax = ref.qrange(bits)
    if backend == "native":
        return native_extension().fake_quantize_backward(grad.to(x.dtype), x, group, qmin, qmax, symmetric,
                                                         eps).reshape(x.shape)
    if backend == "triton":
        from fastft.kernels import qat as kernels

        return kernels.fake_quantize_backward(grad, x, group, qmin, qmax, symmetric, eps)
    return _reference_backward(grad, x, bits, group, symmetric, eps)


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
    with torch.no_grad():
        return ref.fake_quantize_with_scale_ref(x, scale, bits, group, zero_point)


@fake_quantize_with_scale.register_kernel(("cpu", "cuda"))
def _(x, scale, zero_point, bits, group):
    backend = backend_for(x.device.type)
    qmin, qmax = ref.qrange(bits)
    if backend == "native":
        return native_extension().fake_quantize_scaled(x, scale, zero_point, group, qmin, qmax).reshape(x.shape)
    if backend == "triton":
        from fastft.kernels import qat as kernels

        return kernels.fake_quantize_scaled(x, scale, zero_point, group, qmin, qmax)
    with torch.no_grad():
        return ref.fake_quantize_with_scale_ref(x, scale, bits, group, zero_point)


@fake_quantize_with_scale.register_fake
def _(x, scale, zero_point, bits, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scaled_backward_ref(grad, x, scale, zero_point, bits, group):
    """As torchao's autograd: with p = x_dtype(dy * s) and p_in = p inside the range (0 at the clamp),
    dx = p_in * (1 / s), ds = sum over the group of dy * (x_dtype(q) - x_dtype(zp)) - (1 / s)^2 * sum of p_in * x,
    and d(zp) = sum of p_in - x_dtype(sum of p) (zp enters q in fp32 and the dequantization in x's dtype)."""
    qmin, qmax = ref.qrange(bits)
    groups = x.reshape(-1, group)
    s = scale.reshape(-1, 1)
    inv = 1.0 / s
    zp = zero_point.reshape(-1, 1) if zero_point is not None else torch.zeros_like(s)
    pre = torch.round(groups * inv) + zp
    dy = grad.reshape(-1, group)
    p = (dy * s).to(x.dtype)
    passed = torch.where((pre >= qmin) & (pre <= qmax), p.to(torch.float32), 0.0)
    dequantized = torch.clamp(pre, qmin, qmax).to(x.dtype) - zp.to(x.dtype)
    direct = (dy.to(torch.float32) * dequantized).sum(-1, keepdim=True)
    via_inverse = (passed * groups).sum(-1, keepdim=True) * (-(inv * inv))
    grad_scale = (direct + via_inverse).reshape(scale.shape).to(scale.dtype)
    grad_zero_point = scale.new_empty(0)
    if zero_point is not None:
        grad_zero_point = (passed.sum(-1, keepdim=True) - p.sum(-1, keepdim=True).to(torch.float32))
        grad_zero_point = grad_zero_point.reshape(zero_point.shape)
    return (passed * inv).to(x.dtype).reshape(x.shape), grad_scale, grad_zero_point


@torch.library.custom_op("fastft::fake_quantize_with_scale_backward", mutates_args=())
def fake_quantize_with_scale_backward(grad: Tensor, x: Tensor, scale: Tensor, zero_point: Optional[Tensor], bits: int,
                                      group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(dx, dscale, dzero_point) of fastft::fake_quantize_with_scale (dzero_point empty without zero points);
    CPU: one C++ pass (sums in fp64); CUDA: one Triton pass (fp32 sums over each group, as torchao's autograd)."""
    return _scaled_backward_ref(grad, x, scale, zero_point, bits, group)


@fake_quantize_with_scale_backward.register_kernel(("cpu", "cuda"))
def _(grad, x, scale, zero_point, bits, group):
    backend = backend_for(x.device.type)
    qmin, qmax = ref.qrange(bits)
    if backend == "native":
        dx, dscale, dzero = native_extension().fake_quantize_scaled_backward(grad.to(x.dtype), x, scale, zero_point,
                                                                            group, qmin, qmax)
    elif backend == "triton":
        from fastft.kernels import qat as kernels

        dx, dscale, dzero = kernels.fake_quantize_scaled_backward(grad, x, scale, zero_point, group, qmin, qmax)
    else:
        return _scaled_backward_ref(grad, x, scale, zero_point, bits, group)
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


def _quantized_input(x, activation_bits):
    """fq_a(x) per token (or x), as fastft::fake_quantize computes it."""
    if not activation_bits:
        return x
    return fake_quantize(x, activation_bits, x.shape[1], False, ref.default_eps(x.dtype, None))


def _quantized_weight(weight, weight_bits, group, quantize_weight):
    """fq_w(W) per group (or W), as fastft::fake_quantize computes it."""
    if not quantize_weight:
        return weight
    return fake_quantize(weight, weight_bits, group, True, ref.default_eps(weight.dtype, None))


def _triton_operands(x, weight, weight_bits, group, activation_bits, quantize_weight):
    from fastft.kernels import qat as kernels

    x_range = ref.qrange(activation_bits) if activation_bits else None
    w_range = ref.qrange(weight_bits) if quantize_weight else None
    return kernels.FakeQuantOperands(x.contiguous(), weight.contiguous(), group, x_range, w_range,
                                     ref.default_eps(x.dtype, None))


@torch.library.custom_op("fastft::fake_quant_linear", mutates_args=())
def fake_quant_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], weight_bits: int, group: int,
                      activation_bits: int, quantize_weight: bool) -> Tensor:
    if backend_for(x.device.type) == "triton":
        from fastft.kernels import qat as kernels

        return kernels.fake_quant_matmul(
            _triton_operands(x, weight, weight_bits, group, activation_bits, quantize_weight), bias)
    weight_q = _quantized_weight(weight, weight_bits, group, quantize_weight)
    return F.linear(_quantized_input(x, activation_bits), weight_q, bias)


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
    grad_x = grad_weight = grad_bias = None
    if backend_for(x.device.type) == "triton":
        from fastft.kernels import qat as kernels

        operands = _triton_operands(x, weight, *ctx.options)
        grad_x = kernels.fake_quant_matmul_grad_x(operands, dy) if want_x else None
        grad_weight = kernels.fake_quant_matmul_grad_w(operands, dy) if want_weight else None
    else:  # each fake-quantized operand is recomputed only for the gradient that needs it
        if want_x:
            grad_x = dy @ _quantized_weight(weight, weight_bits, group, quantize_weight)
            if activation_bits:
                grad_x = fake_quantize_backward(grad_x, x, activation_bits, x.shape[1], False,
                                                ref.default_eps(x.dtype, None))
        if want_weight:
            grad_weight = dy.t() @ _quantized_input(x, activation_bits)
            if quantize_weight:
                grad_weight = fake_quantize_backward(grad_weight, weight, weight_bits, group, True,
                                                     ref.default_eps(x.dtype, None))
    if ctx.has_bias and ctx.needs_input_grad[2]:
        grad_bias = dy.sum(0)
    return grad_x, grad_weight, grad_bias, None, None, None, None


fake_quant_linear.register_autograd(_backward_linear, setup_context=_setup_linear)
