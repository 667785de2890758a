"""Plain-torch ground truth of fastft's fake quantization: torchao's `IntxFakeQuantizer` numerics, op for op.

Groups are runs of `group_size` consecutive elements along the last dim (per_channel: the whole last dim of a
weight; per_token: the whole last dim of an activation). Integer range for `bits`: [-2^(bits-1), 2^(bits-1) - 1].
- symmetric (per_group, per_channel): amax = max(-min(x_min, 0), max(x_max, 0)); scale = amax / ((qmax - qmin) / 2)
  in x's dtype, clamped to >= eps, then fp32; zero point 0.
- asymmetric (per_token, per_group, per_channel): scale = (max(x_max, 0) - min(x_min, 0)) / (qmax - qmin) in x's
  dtype, clamped to >= eps;
  zero point = clamp(qmin - round(min(x_min, 0) / scale), qmin, qmax); scale then fp32.
- q = clamp(round_half_even(x * (1 / scale)) + zp, qmin, qmax); out = ((q - zp) * scale) in x's dtype.
- Backward (the scales are constants, as in torchao): dx = x_dtype(where(clamp inactive, x_dtype(dy * scale), 0)
  * (1 / scale)): the straight-through gradient inside the range, 0 where the clamp was active; e.g. the group max of
  a symmetric int4 group maps to 7.5 -> 8 -> 7 and gets no gradient.
eps defaults to the smallest normal number of x's dtype.

NaN and infinities propagate as in torchao, whose min / max / clamp all propagate NaN:
- a NaN in a group makes its scale NaN: the whole group's outputs and gradients are NaN;
- +inf or -inf in a group makes its scale inf. Symmetric, or asymmetric with +inf only: every output of the group
  is NaN (0 * inf, and the infinite element itself inf * 0), and dx is NaN except at the infinite elements (0:
  their pre-clamp value is NaN, so the clamp mask drops them);
- asymmetric with -inf: min / scale is -inf / inf = NaN, so the zero point is NaN before torch's cast to int32,
  which is the platform's conversion: INT32_MIN on x86 CPUs, where the finite elements then clamp to qmin and
  dequantize to (qmin - zp) * inf = +inf (the infinite elements: NaN), all with dx 0 (where the conversion gives 0
  instead, as CUDA's does, every output of the group is NaN);
- with given (learned) scales, an element is NaN exactly where x is (the clamp keeps NaN) and +-inf clamps to the
  end of the range; dx is 0 at those elements, d(scale) of their group is NaN (torchao's 0 * x term).

Asymmetric per_group / per_channel are torchao's affine primitives on blocks (1, group):
choose_qparams_affine(MappingType.ASYMMETRIC, int{bits} range) + _fake_quantize_affine, the per-token formula
applied to each group. torchao's IntxFakeQuantizer computes other qparams for that config: a scale for the unsigned
range [0, 2^bits - 1] and a float zero point min + scale * 2^(bits-1), truncated to int32, then quantizes into
the signed range, so a group whose values are not spread around zero is clamped (int4, a group in [1.3, 4.9]
fake-quantizes to 0.95 everywhere). fastft does not reproduce that.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.formats.qat import GRANULARITIES, default_eps, group_length, qrange  # noqa: F401  (re-exported)


class _RoundSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


def qparams_ref(x: Tensor, bits: int, group: int, symmetric: bool, eps: Optional[float] = None):
    """(scale fp32, zero_point fp32) per group, shape (numel / group, 1)."""
    qmin, qmax = qrange(bits)
    eps = default_eps(x.dtype, eps)
    with torch.no_grad():
        groups = x.reshape(-1, group)
        min_neg = torch.min(groups.amin(-1, keepdim=True), torch.zeros((), dtype=x.dtype))
        max_pos = torch.max(groups.amax(-1, keepdim=True), torch.zeros((), dtype=x.dtype))
        if symmetric:
            scale = torch.clamp(torch.max(-min_neg, max_pos) / (float(qmax - qmin) / 2), min=eps)
            zero_point = torch.zeros_like(scale)
        else:
            scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=eps)
            zero_point = torch.clamp(qmin - torch.round(min_neg / scale), qmin, qmax)
        return scale.to(torch.float32), zero_point.to(torch.int32).to(torch.float32)


def fake_quantize_groups_ref(x: Tensor, bits: int, group: int, symmetric: bool, eps: Optional[float] = None) -> Tensor:
    """Fake quantization over contiguous groups of `group` elements (validated arguments); differentiable in x
    with torchao's straight-through rounding."""
    qmin, qmax = qrange(bits)
    scale, zero_point = qparams_ref(x, bits, group, symmetric, eps)
    groups = x.reshape(-1, group)
    q = torch.clamp(_RoundSTE.apply(groups * (1.0 / scale)) + zero_point, qmin, qmax)
    # q and the zero point go to x's dtype before the fp32 scale multiplies them, as in torchao (this rounds the
    # gradient dy * scale to x's dtype on the way back)
    return ((q.to(x.dtype) - zero_point.to(x.dtype)) * scale).reshape(x.shape).to(x.dtype)


def fake_quantize_ref(x: Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True,
                      granularity: str = "per_group", eps: Optional[float] = None) -> Tensor:
    """x (..., K) in fp32 / fp16 / bf16 -> fake-quantized x, same shape and dtype (differentiable, STE)."""
    return fake_quantize_groups_ref(x, bits, group_length(x.shape, group_size, granularity, symmetric), symmetric,
                                    eps)


def fake_quantize_with_scale_ref(x: Tensor, scale: Tensor, bits: int, group: int,
                                 zero_point: Optional[Tensor] = None) -> Tensor:
    """Fake quantization with given (learnable) fp32 scales, and zero points for the asymmetric form, one per group
    of `group` consecutive elements: torchao's range-learning forward, op for op, differentiable in x
    (straight-through), in scale (LSQ-style: dq/ds = q - x / s inside the range, q at the clamp) and in the zero
    point (0 inside the range, -s at the clamp, summed over two paths as torchao's autograd does):
        q = clamp(round(x * (1 / s)) + zp, qmin, qmax),  out = x_dtype((x_dtype(q) - x_dtype(zp)) * s)."""
    qmin, qmax = qrange(bits)
    groups = x.reshape(-1, group)
    s = scale.reshape(-1, 1)
    rounded = _RoundSTE.apply(groups * (1.0 / s))
    if zero_point is None:
        q = torch.clamp(rounded, qmin, qmax)
        return (q.to(x.dtype) * s).reshape(x.shape).to(x.dtype)
    zp = zero_point.reshape(-1, 1)
    q = torch.clamp(rounded + zp, qmin, qmax)
    return ((q.to(x.dtype) - zp.to(x.dtype)) * s).reshape(x.shape).to(x.dtype)
