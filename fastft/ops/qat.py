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
    qmin, qmax = ref.qrange(bits)
    scale, zero_point = ref.qparams_ref(x, bits, group, symmetric, eps)
    q = torch.clamp(torch.round(x.reshape(-1, group) * (1.0 / scale)) + zero_point, qmin, qmax)
    return ((q.to(x.dtype) - zero_point.to(x.dtype)) * scale).reshape(x.shape).to(x.dtype)


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
