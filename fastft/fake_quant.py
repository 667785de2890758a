"""Fake quantization with torchao's exact numerics, in one pass per group: the functions behind fastft.qat (which
adds the QAT recipe, prepare / convert, from fastft/methods/qat.py) and fastft.nn.FakeQuantLinear."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.ops import qat as qat_ops
from fastft.ops.qat import GRANULARITIES, default_eps, group_length, qrange

__all__ = ["GRANULARITIES", "fake_quantize", "fake_quantize_with_scale", "initial_qparams", "initial_scales"]


def fake_quantize(x: Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True,
                  granularity: str = "per_group", eps: Optional[float] = None) -> Tensor:
    """Fake-quantize x (..., K) (fp32 / fp16 / bf16) like torchao's `IntxFakeQuantizer` with
    `IntxFakeQuantizeConfig(torch.int{bits}, granularity, group_size=..., is_symmetric=...)`: bit-exact outputs and
    gradients (straight-through inside the range, zero where clamped). Supported: per_group and per_channel,
    symmetric or asymmetric; asymmetric per_token (activations); bits 2..8. Asymmetric per_group / per_channel
    equal torchao's affine primitives (choose_qparams_affine + fake_quantize_affine on blocks of one group), not
    its IntxFakeQuantizer, whose qparams for that config clamp groups not spread around zero (see
    fastft/reference/qat.py). The result has x's shape and dtype."""
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    qrange(bits)
    group = group_length(x.shape, group_size, granularity, symmetric)
    return qat_ops.fake_quantize(x.contiguous(), bits, group, symmetric, default_eps(x.dtype, eps))


def initial_scales(weight: Tensor, bits: int = 4, group_size: int = 32) -> Tensor:
    """fp32 scales (rows, K // group_size) of symmetric per-group fake quantization of a 2-D weight, clamped to
    >= 1e-9: the starting point of learned scales, as torchao's range learning initializes them."""
    return initial_qparams(weight, bits, group_size)[0]


def initial_qparams(weight: Tensor, bits: int = 4, group_size: int = 32,
                    symmetric: bool = True) -> tuple[Tensor, Optional[Tensor]]:
    """(scale, zero_point) to start learning from, fp32 (rows, K // group_size) each, of per-group fake quantization
    of a 2-D weight: the dynamic qparams, scales clamped to >= 1e-9 as torchao's range learning does; zero_point is
    None when symmetric. Asymmetric qparams are torchao's affine ones (see `fake_quantize`): torchao's
    IntxFakeQuantizer would start range learning from its tinygemm-style qparams instead."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D, got shape {tuple(weight.shape)}")
    group = group_length(weight.shape, group_size, "per_group", symmetric)
    scale, zero_point = qat_ops.qparams(weight.detach(), bits, group, symmetric)
    scale = scale.reshape(weight.shape[0], -1).clamp(min=1e-9)
    return scale, None if symmetric else zero_point.reshape(weight.shape[0], -1)


def _described(t) -> str:
    return f"{t.dtype} of shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def fake_quantize_with_scale(x: Tensor, scale: Tensor, bits: int = 4, group_size: int = 32,
                             zero_point: Optional[Tensor] = None) -> Tensor:
    """Per-group fake quantization of x (rows, K) with learnable fp32 scales (rows, K // group_size) and, for the
    asymmetric form, learnable fp32 zero points of the same shape: torchao's range-learning numerics
    (IntxFakeQuantizeConfig(..., is_dynamic=False, range_learning=True), with zero_point_precision=torch.float32
    when asymmetric), bit-exact in the output and in the gradient of x (straight-through); the gradients of scale
    (LSQ-style) and zero point are torchao's formulas with their sums taken in fp64 on CPU (fp32 on GPU).
    x with more leading dims (..., K) takes qparams of shape (..., K // group_size). Any other shape of scale or
    zero_point raises ValueError, even with the right number of values. NaN in x gives NaN at that element only;
    +-inf clamps to the end of the range."""
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    group = group_length(x.shape, group_size, "per_group", zero_point is None)
    qrange(bits)
    expected = (*x.shape[:-1], x.shape[-1] // group)
    shape_name = "(rows, K // group_size)" if x.dim() == 2 else "(*x.shape[:-1], K // group_size)"
    if not isinstance(scale, Tensor) or scale.dtype != torch.float32 or tuple(scale.shape) != expected:
        raise ValueError(f"scale must be a float32 tensor of shape {shape_name} = {expected} for x of shape "
                         f"{tuple(x.shape)} and group_size {group_size}, got {_described(scale)}")
    if zero_point is not None and (not isinstance(zero_point, Tensor) or zero_point.dtype != torch.float32
                                   or tuple(zero_point.shape) != expected):
        raise ValueError(f"zero_point must be float32 of scale's shape {shape_name} = {expected} for x of shape "
                         f"{tuple(x.shape)} and group_size {group_size}, got {_described(zero_point)}")
    return qat_ops.fake_quantize_with_scale(x.contiguous(), scale, zero_point, bits, group)
