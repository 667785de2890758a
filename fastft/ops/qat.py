"""torch.library ops of fake quantization (formulas and torchao parity: fastft/reference/qat.py).

- fastft::fake_quantize(x, bits, group, symmetric, eps): x fake-quantized over contiguous groups of `group`
  elements along the last dim, torchao's numerics bit for bit. CPU: one C++ pass per group (min/max, scale, values;
  AVX2 for fp32). CUDA: one Triton pass (kernels/qat.py).
- fastft::fake_quantize_backward(grad, x, bits, group, symmetric, eps): the straight-through gradient, zero where
  the clamp was active. The scales and the clamp mask are recomputed from x in one pass, so backward saves only x
  (itemsize bytes per element, and for a weight that is the parameter itself); torchao's autograd keeps fp32
  intermediates of x's size instead.
"""

from __future__ import annotations

import torch
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
    through = (grad.reshape(-1, group) * scale).to(x.dtype) * inv
    return torch.where((pre >= qmin) & (pre <= qmax), through, 0.0).reshape(x.shape).to(x.dtype)


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
def fake_quantize_with_scale(x: Tensor, scale: Tensor, bits: int, group: int) -> Tensor:
    """Symmetric fake quantization with given fp32 scales (numel / group of them): learned scales (LSQ /
    torchao range learning). CPU: one C++ pass; CUDA: one Triton pass."""
    with torch.no_grad():
        return ref.fake_quantize_with_scale_ref(x, scale, bits, group)


@fake_quantize_with_scale.register_kernel(("cpu", "cuda"))
def _(x, scale, bits, group):
    backend = backend_for(x.device.type)
    qmin, qmax = ref.qrange(bits)
    if backend == "native":
        return native_extension().fake_quantize_scaled(x, scale, group, qmin, qmax).reshape(x.shape)
    if backend == "triton":
        from fastft.kernels import qat as kernels

        return kernels.fake_quantize_scaled(x, scale, group, qmin, qmax)
    with torch.no_grad():
        return ref.fake_quantize_with_scale_ref(x, scale, bits, group)


@fake_quantize_with_scale.register_fake
def _(x, scale, bits, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scaled_backward_ref(grad, x, scale, bits, group):
    """As torchao's autograd: with p = x_dtype(dy * s) inside the range (0 outside), dx = p * (1 / s) and
    ds = sum over the group of dy * q - (1 / s)^2 * sum of p * x."""
    qmin, qmax = ref.qrange(bits)
    groups = x.reshape(-1, group)
    s = scale.reshape(-1, 1)
    inv = 1.0 / s
    pre = torch.round(groups * inv)
    dy = grad.reshape(-1, group)
    passed = torch.where((pre >= qmin) & (pre <= qmax), (dy * s).to(x.dtype).to(torch.float32), 0.0)
    q = torch.clamp(pre, qmin, qmax).to(x.dtype)
    direct = (dy.to(torch.float32) * q).sum(-1, keepdim=True)
    via_inverse = (passed * groups).sum(-1, keepdim=True) * (-(inv * inv))
    return (passed * inv).to(x.dtype).reshape(x.shape), (direct + via_inverse).reshape(scale.shape).to(scale.dtype)


@torch.library.custom_op("fastft::fake_quantize_with_scale_backward", mutates_args=())
def fake_quantize_with_scale_backward(grad: Tensor, x: Tensor, scale: Tensor, bits: int,
                                      group: int) -> tuple[Tensor, Tensor]:
    """(dx, dscale) of fastft::fake_quantize_with_scale; CPU: one C++ pass (sums in fp64); CUDA: one Triton pass
    (fp32 sums over each group, as torchao's autograd)."""
    return _scaled_backward_ref(grad, x, scale, bits, group)


@fake_quantize_with_scale_backward.register_kernel(("cpu", "cuda"))
def _(grad, x, scale, bits, group):
    backend = backend_for(x.device.type)
    qmin, qmax = ref.qrange(bits)
    if backend == "native":
        dx, dscale = native_extension().fake_quantize_scaled_backward(grad.to(x.dtype), x, scale, group, qmin, qmax)
        return dx.reshape(x.shape), dscale.reshape(scale.shape)
    if backend == "triton":
        from fastft.kernels import qat as kernels

        dx, dscale = kernels.fake_quantize_scaled_backward(grad, x, scale, group, qmin, qmax)
        return dx.reshape(x.shape), dscale.reshape(scale.shape)
    return _scaled_backward_ref(grad, x, scale, bits, group)


@fake_quantize_with_scale_backward.register_fake
def _(grad, x, scale, bits, group):
    return torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(scale)


def _setup_scaled(ctx, inputs, output):
    x, scale, bits, group = inputs
    ctx.save_for_backward(x, scale)
    ctx.options = (bits, group)


def _backward_scaled(ctx, grad):
    x, scale = ctx.saved_tensors
    grad_x, grad_scale = fake_quantize_with_scale_backward(grad, x, scale, *ctx.options)
    return (grad_x if ctx.needs_input_grad[0] else None, grad_scale if ctx.needs_input_grad[1] else None, None, None)


fake_quantize_with_scale.register_autograd(_backward_scaled, setup_context=_setup_scaled)
