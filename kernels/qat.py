"""Triton kernels of fake quantization (torchao's numerics, fastft/reference/qat.py), forward and backward.

One program takes BLOCK_G groups of GROUP contiguous elements (a [BLOCK_G, BLOCK_K] tile, BLOCK_K the next power of
two >= GROUP): min/max, the scale (rounded to x's dtype, then fp32) and zero point, then the values, in one read
of x (forward: 2 x itemsize bytes per element; backward: 3 x itemsize, the clamp mask recomputed from x).
Bit-exactness: divisions are correctly rounded (div_rn), rounding is half-to-even by integer-exact arithmetic,
casts to bf16 round to nearest even with integer ops (the interpreter's float cast truncates), and the kernels are
launched without FMA contraction.

_fake_quantize_scaled_kernel is the same pass with given (learned) per-group fp32 scales, symmetric: forward
q = clamp(round(x / s)) and q * s; backward dx (straight-through) and d(scale) per group (fp32 sums over the
group's tile, as torchao's autograd) from one read of x and dy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastft.kernels.nf4 import _to_bf16_rtne


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _in_dtype(v, DTYPE: tl.constexpr):
    """fp32 v rounded to DTYPE (nearest even) and back to fp32; for bf16 with integer ops only (exact for
    subnormals too, where the interpreter's bf16 -> fp32 conversion is not)."""
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        return (((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16).to(tl.float32, bitcast=True)
    if DTYPE == tl.float16:
        return v.to(tl.float16).to(tl.float32)
    return v


@triton.jit
def _store(ptr, v, mask, DTYPE: tl.constexpr):
    if DTYPE == tl.bfloat16:
        tl.store(ptr, _to_bf16_rtne(v), mask=mask)
    else:
        tl.store(ptr, v.to(DTYPE), mask=mask)


@triton.jit
def _fake_quantize_kernel(x_ptr, grad_ptr, out_ptr, n_groups, group, qmin, qmax, eps, SYMMETRIC: tl.constexpr,
                          BACKWARD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < n_groups) & (cols[None, :] < group)
    offsets = rows[:, None] * group + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    lo = tl.min(tl.where(mask, x, float("inf")), axis=1)
    hi = tl.max(tl.where(mask, x, float("-inf")), axis=1)
    min_neg = tl.minimum(lo, 0.0)
    max_pos = tl.maximum(hi, 0.0)
    if SYMMETRIC:
        scale = _in_dtype(tl.math.div_rn(tl.maximum(-min_neg, max_pos), (qmax - qmin) * 0.5), DTYPE)
        scale = tl.maximum(scale, eps)
        zero_point = tl.zeros_like(scale)
    else:
        spread = _in_dtype(max_pos - min_neg, DTYPE)
        scale = tl.maximum(_in_dtype(tl.math.div_rn(spread, qmax - qmin), DTYPE), eps)
        zero_point = _in_dtype(qmin - _round_half_even(_in_dtype(tl.math.div_rn(min_neg, scale), DTYPE)), DTYPE)
        zero_point = tl.minimum(tl.maximum(zero_point, qmin), qmax)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    pre = _round_half_even(x * inv[:, None]) + zero_point[:, None]
    if BACKWARD:
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        through = _in_dtype(grad * scale[:, None], DTYPE) * inv[:, None]
        _store(out_ptr + offsets, tl.where((pre >= qmin) & (pre <= qmax), through, 0.0), mask, DTYPE)
    else:
        q = tl.minimum(tl.maximum(pre, qmin), qmax)
        _store(out_ptr + offsets, (q - zero_point[:, None]) * scale[:, None], mask, DTYPE)


def _launch(x, grad, group, qmin, qmax, symmetric, eps, backward):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n_groups = x.numel() // group
    block_k = triton.next_power_of_2(group)
    block_g = max(1, min(64, 4096 // block_k))
    _fake_quantize_kernel[(triton.cdiv(n_groups, block_g),)](
        x, grad.contiguous() if grad is not None else x, out, n_groups, group, float(qmin), float(qmax), float(eps),
        SYMMETRIC=symmetric, BACKWARD=backward, BLOCK_G=block_g, BLOCK_K=block_k, enable_fp_fusion=False)
    return out


def fake_quantize(x, group, qmin, qmax, symmetric, eps):
    """x fake-quantized over contiguous groups of `group` elements; x's shape and dtype."""
    return _launch(x, None, group, qmin, qmax, symmetric, eps, backward=False)


def fake_quantize_backward(grad, x, group, qmin, qmax, symmetric, eps):
    """The straight-through gradient for grad (x's shape and dtype)."""
    return _launch(x, grad.to(x.dtype), group, qmin, qmax, symmetric, eps, backward=True)


@triton.jit
def _fake_quantize_scaled_kernel(x_ptr, scale_ptr, grad_ptr, out_ptr, grad_scale_ptr, n_groups, group, qmin, qmax,
                                 BACKWARD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < n_groups) & (cols[None, :] < group)
    offsets = rows[:, None] * group + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < n_groups, other=1.0)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    pre = _round_half_even(x * inv[:, None])
    q = tl.minimum(tl.maximum(pre, qmin), qmax)
    if BACKWARD:
        dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        passed = tl.where((pre >= qmin) & (pre <= qmax) & mask, _in_dtype(dy * scale[:, None], DTYPE), 0.0)
        _store(out_ptr + offsets, passed * inv[:, None], mask, DTYPE)
        grad_scale = tl.sum(dy * q, axis=1) + tl.sum(passed * x, axis=1) * (-(inv * inv))
        tl.store(grad_scale_ptr + rows, grad_scale, mask=rows < n_groups)
    else:
        _store(out_ptr + offsets, q * scale[:, None], mask, DTYPE)


def _launch_scaled(x, scale, grad, group, qmin, qmax):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n_groups = x.numel() // group
    grad_scale = torch.empty(n_groups, dtype=torch.float32, device=x.device) if grad is not None else None
    block_k = triton.next_power_of_2(group)
    block_g = max(1, min(64, 4096 // block_k))
    _fake_quantize_scaled_kernel[(triton.cdiv(n_groups, block_g),)](
        x, scale.contiguous(), grad.contiguous() if grad is not None else x, out,
        grad_scale if grad_scale is not None else scale, n_groups, group, float(qmin), float(qmax),
        BACKWARD=grad is not None, BLOCK_G=block_g, BLOCK_K=block_k, enable_fp_fusion=False)
    return out, grad_scale


def fake_quantize_scaled(x, scale, group, qmin, qmax):
    """x fake-quantized with the given fp32 scales (one per group of `group` elements); x's shape and dtype."""
    return _launch_scaled(x, scale, None, group, qmin, qmax)[0]


def fake_quantize_scaled_backward(grad, x, scale, group, qmin, qmax):
    """(dx in x's dtype and shape, d(scale) fp32 (numel / group,)) for grad of x's shape."""
    return _launch_scaled(x, scale, grad.to(x.dtype), group, qmin, qmax)
