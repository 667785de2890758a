"""Triton kernels of fake quantization (torchao's numerics, fastft/reference/qat.py), forward and backward.

One program takes BLOCK_G groups of GROUP contiguous elements (a [BLOCK_G, BLOCK_K] tile, BLOCK_K the next power of
two >= GROUP): min/max, the scale (rounded to x's dtype, then fp32) and zero point, then the values, in one read
of x (forward: 2 x itemsize bytes per element; backward: 3 x itemsize, the clamp mask recomputed from x).
Bit-exactness: divisions are correctly rounded (div_rn), rounding is half-to-even by integer-exact arithmetic,
casts to bf16 round to nearest even with integer ops (the interpreter's float cast truncates), and the kernels are
launched without FMA contraction.
NaN propagates as in torchao (fastft/reference/qat.py): the group min/max reduction also reduces a NaN flag (in the
same read of x), so a NaN in a group makes its scale NaN; every other min/max/clamp propagates NaN (max.NaN.f32 on
sm_80+, one instruction like the plain max); a NaN zero point (an asymmetric group holding -inf) goes through the
device's int32 conversion, as torch's cast does; and a NaN scale makes every gradient of its group NaN.

_fake_quantize_with_scale_kernel is the same pass with given (learned) per-group fp32 scales and optional zero points:
forward q = clamp(round(x / s) + zp) and (q - zp) * s; backward dx (straight-through), d(scale) and d(zero point)
per group (fp32 sums over the group's tile, as torchao's autograd) from one read of x and dy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastft.kernels.common import _INTERPRET, Tuned, _dot, _to_bf16_rtne, config, fp32_precision


@triton.jit
def _round_half_even(v):
    r = tl.floor(v + 0.5)
    odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
    return tl.where(((r - v) == 0.5) & odd, r - 1.0, r)


@triton.jit
def _max_keep_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _min_keep_nan(a, b):
    return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _clamp_keep_nan(v, lo, hi):
    """min(max(v, lo), hi), NaN where v is NaN (torch.clamp)."""
    return _min_keep_nan(_max_keep_nan(v, lo), hi)


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
def _qparams(x, mask, qmin, qmax, eps, SYMMETRIC: tl.constexpr, DTYPE: tl.constexpr):
    """(scale, zero point, 1 / scale), fp32, of each row of the fp32 tile x (a row = a group; masked-out lanes
    ignored): torchao's choose_qparams, with the scale rounded to DTYPE. tl.min / tl.max skip NaN, so a NaN flag
    per group, reduced alongside them, makes the min and max of a group holding NaN NaN, and so its scale."""
    has_nan = tl.max(tl.where(x != x, 1.0, 0.0), axis=1) != 0.0  # masked-out lanes hold 0.0, not NaN
    lo = tl.where(has_nan, float("nan"), tl.min(tl.where(mask, x, float("inf")), axis=1))
    hi = tl.where(has_nan, float("nan"), tl.max(tl.where(mask, x, float("-inf")), axis=1))
    min_neg = _min_keep_nan(lo, 0.0)
    max_pos = _max_keep_nan(hi, 0.0)
    if SYMMETRIC:
        scale = _in_dtype(tl.math.div_rn(_max_keep_nan(-min_neg, max_pos), (qmax - qmin) * 0.5), DTYPE)
        scale = _max_keep_nan(scale, eps)
        zero_point = tl.zeros_like(scale)
    else:
        spread = _in_dtype(max_pos - min_neg, DTYPE)
        scale = _max_keep_nan(_in_dtype(tl.math.div_rn(spread, qmax - qmin), DTYPE), eps)
        zero_point = _in_dtype(qmin - _round_half_even(_in_dtype(tl.math.div_rn(min_neg, scale), DTYPE)), DTYPE)
        # torchao keeps zero points as int32: exact for qmin..qmax; NaN converts as torch's cast on this device does
        zero_point = _clamp_keep_nan(zero_point, qmin, qmax).to(tl.int32).to(tl.float32)
    return scale, zero_point, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _fake_quantized(x, scale, zero_point, inv, qmin, qmax, DTYPE: tl.constexpr):
    """Fake-quantized values of the fp32 tile x, each element with the (broadcast) qparams of its group; fp32
    holding a DTYPE value."""
    q = _clamp_keep_nan(_round_half_even(x * inv) + zero_point, qmin, qmax)
    return _in_dtype((q - zero_point) * scale, DTYPE)


@triton.jit
def _straight_through(grad, x, scale, zero_point, inv, qmin, qmax, DTYPE: tl.constexpr):
    """torchao's gradient at x for the incoming fp32 grad: DTYPE(grad * scale) / scale where not clamped, else 0.
    torchao's autograd masks first and then multiplies by 1 / scale, so where inv is NaN (or inf, a zero scale with
    eps=0) every gradient of the group is NaN; testing 0 * inv once per row gives that while keeping the multiply
    inside the select (fewer live registers than a multiply after it)."""
    pre = _round_half_even(x * inv) + zero_point
    return tl.where((pre >= qmin) & (pre <= qmax) | (inv * 0.0 != 0.0), _in_dtype(grad * scale, DTYPE) * inv, 0.0)


@triton.jit
def _fake_quantize_kernel(x_ptr, grad_ptr, out_ptr, n_groups, group, qmin, qmax, eps, SYMMETRIC: tl.constexpr,
                          BACKWARD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < n_groups) & (cols[None, :] < group)
    offsets = rows[:, None] * group + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale, zero_point, inv = _qparams(x, mask, qmin, qmax, eps, SYMMETRIC, DTYPE)
    if BACKWARD:
        grad = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        through = _straight_through(grad, x, scale[:, None], zero_point[:, None], inv[:, None], qmin, qmax, DTYPE)
        _store(out_ptr + offsets, through, mask, DTYPE)
    else:
        _store(out_ptr + offsets, _fake_quantized(x, scale[:, None], zero_point[:, None], inv[:, None], qmin, qmax,
                                                  DTYPE), mask, DTYPE)


@triton.jit
def _qparams_kernel(x_ptr, scale_ptr, zero_point_ptr, n_groups, group, qmin, qmax, eps, SYMMETRIC: tl.constexpr,
                    BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 scale and zero point of each group: what the fused fake-quant matmuls read (N * K / group floats)."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < n_groups) & (cols[None, :] < group)
    x = tl.load(x_ptr + rows[:, None] * group + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    scale, zero_point, _ = _qparams(x, mask, qmin, qmax, eps, SYMMETRIC, DTYPE)
    tl.store(scale_ptr + rows, scale, mask=rows < n_groups)
    tl.store(zero_point_ptr + rows, zero_point, mask=rows < n_groups)


def _group_launch(n_groups: int, group: int) -> tuple[tuple[int], dict]:
    """Grid, block sizes and warps of the one-pass group kernels: a group per row of a (BLOCK_G, BLOCK_K) tile, about
    4096 elements a program (one whole group when wider)."""
    block_k = triton.next_power_of_2(group)
    block_g = max(1, min(64, 4096 // block_k))
    # groups wider than 4096 (per-channel over a 14336-wide row): more warps, ~32 elements a thread, no spills
    warps = min(16, max(4, block_g * block_k // 1024))
    return (triton.cdiv(n_groups, block_g),), dict(BLOCK_G=block_g, BLOCK_K=block_k, enable_fp_fusion=False,
                                                   num_warps=warps)


def _launch(x, grad, group, qmin, qmax, symmetric, eps, backward):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n_groups = x.numel() // group
    grid, blocks = _group_launch(n_groups, group)
    _fake_quantize_kernel[grid](
        x, grad.contiguous() if grad is not None else x, out, n_groups, group, float(qmin), float(qmax), float(eps),
        SYMMETRIC=symmetric, BACKWARD=backward, **blocks)
    return out


def fake_quantize(x, group, qmin, qmax, symmetric, eps):
    """x fake-quantized over contiguous groups of `group` elements; x's shape and dtype."""
    return _launch(x, None, group, qmin, qmax, symmetric, eps, backward=False)


def fake_quantize_backward(grad, x, group, qmin, qmax, symmetric, eps):
    """The straight-through gradient for grad (x's shape and dtype)."""
    return _launch(x, grad.to(x.dtype), group, qmin, qmax, symmetric, eps, backward=True)


@triton.jit
def _fake_quantize_with_scale_kernel(x_ptr, scale_ptr, zero_point_ptr, grad_ptr, out_ptr, grad_scale_ptr,
                                 grad_zero_point_ptr, n_groups, group, qmin, qmax, HAS_ZERO_POINT: tl.constexpr,
                                 BACKWARD: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr):
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    rows = tl.program_id(0).to(tl.int64) * BLOCK_G + tl.arange(0, BLOCK_G)
    cols = tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < n_groups) & (cols[None, :] < group)
    offsets = rows[:, None] * group + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + rows, mask=rows < n_groups, other=1.0)
    if HAS_ZERO_POINT:
        zero_point = tl.load(zero_point_ptr + rows, mask=rows < n_groups, other=0.0)
    else:
        zero_point = tl.zeros_like(scale)
    inv = tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)
    pre = _round_half_even(x * inv[:, None]) + zero_point[:, None]
    q = _clamp_keep_nan(pre, qmin, qmax)
    dequantized = _in_dtype(_in_dtype(q, DTYPE) - _in_dtype(zero_point, DTYPE)[:, None], DTYPE)
    if BACKWARD:
        dy = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(tl.float32)
        p = tl.where(mask, _in_dtype(dy * scale[:, None], DTYPE), 0.0)
        passed = tl.where((pre >= qmin) & (pre <= qmax), p, 0.0)
        _store(out_ptr + offsets, passed * inv[:, None], mask, DTYPE)
        grad_scale = tl.sum(dy * dequantized, axis=1) + tl.sum(passed * x, axis=1) * (-(inv * inv))
        tl.store(grad_scale_ptr + rows, grad_scale, mask=rows < n_groups)
        if HAS_ZERO_POINT:
            grad_zero_point = tl.sum(passed, axis=1) - _in_dtype(tl.sum(p, axis=1), DTYPE)
            tl.store(grad_zero_point_ptr + rows, grad_zero_point, mask=rows < n_groups)
    else:
        _store(out_ptr + offsets, dequantized * scale[:, None], mask, DTYPE)


def _launch_scaled(x, scale, zero_point, grad, group, qmin, qmax):
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n_groups = x.numel() // group
    backward = grad is not None
    grad_scale = torch.empty(n_groups, dtype=torch.float32, device=x.device) if backward else None
    grad_zero_point = (torch.empty(n_groups, dtype=torch.float32, device=x.device) if backward and
                       zero_point is not None else scale.new_empty(0))
    grid, blocks = _group_launch(n_groups, group)
    _fake_quantize_with_scale_kernel[grid](
        x, scale.contiguous(), zero_point.contiguous() if zero_point is not None else scale,
        grad.contiguous() if backward else x, out, grad_scale if backward else scale,
        grad_zero_point if grad_zero_point.numel() else scale, n_groups, group, float(qmin), float(qmax),
        HAS_ZERO_POINT=zero_point is not None, BACKWARD=backward, **blocks)
    return out, grad_scale, grad_zero_point


def fake_quantize_with_scale(x, scale, zero_point, group, qmin, qmax):
    """x fake-quantized with the given fp32 scales (one per group of `group` elements) and fp32 zero points (or
    None: symmetric); x's shape and dtype."""
    return _launch_scaled(x, scale, zero_point, None, group, qmin, qmax)[0]


def fake_quantize_with_scale_backward(grad, x, scale, zero_point, group, qmin, qmax):
    """(dx in x's dtype and shape, d(scale) fp32 (numel / group,), d(zero point) fp32 (numel / group,), empty
    without zero points) for grad of x's shape."""
    return _launch_scaled(x, scale, zero_point, grad.to(x.dtype), group, qmin, qmax)


# Fused fake-quant linear: y = fq_x(x) @ fq_w(W)^T + b with the fake quantization done in the GEMMs' prologues
# (x per token, asymmetric; W per group of `group` along K, symmetric) from precomputed qparams, so neither
# fake-quantized operand is ever written; backward's straight-through masks are applied in the epilogues.
# Bytes per GEMM: x, W (and dy) read once per tile row/column, plus M * 2 + N * K / group fp32 qparams.


@triton.jit
def _tile(ptr, rows, cols, R, C):
    """fp32 tile [rows, cols] of a row-major (R, C) tensor (0 outside), and its in-bounds mask."""
    mask = (rows[:, None] < R) & (cols[None, :] < C)
    return tl.load(ptr + rows.to(tl.int64)[:, None] * C + cols[None, :], mask=mask, other=0.0).to(tl.float32), mask


@triton.jit
def _token_qparams(x_scale_ptr, x_zero_ptr, offs_m, M):
    """(scale, zero point, 1 / scale) of the tokens offs_m, as (len(offs_m), 1) columns."""
    scale = tl.load(x_scale_ptr + offs_m, mask=offs_m < M, other=1.0)[:, None]
    zero_point = tl.load(x_zero_ptr + offs_m, mask=offs_m < M, other=0.0)[:, None]
    return scale, zero_point, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _group_qparams(w_scale_ptr, offs_n, offs_k, N, K, group):
    """(scale, 1 / scale) of W's elements [offs_n, offs_k] (one scale per group of `group` along K)."""
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    index = offs_n.to(tl.int64)[:, None] * (K // group) + offs_k[None, :] // group
    scale = tl.load(w_scale_ptr + index, mask=mask, other=1.0)
    return scale, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale)


@triton.jit
def _weight_tile(w_ptr, w_scale_ptr, offs_n, offs_k, N, K, group, w_qmin, w_qmax, QUANTIZE_W: tl.constexpr,
                 DTYPE: tl.constexpr):
    """fq_w(W)[n, k] (or W) for n in offs_n, k in offs_k, as an fp32 (len(offs_n), len(offs_k)) tile."""
    w, _ = _tile(w_ptr, offs_n, offs_k, N, K)
    if QUANTIZE_W:
        scale, inv = _group_qparams(w_scale_ptr, offs_n, offs_k, N, K, group)
        w = _fake_quantized(w, scale, 0.0, inv, w_qmin, w_qmax, DTYPE)
    return w


@triton.jit
def _input_tile(x_ptr, x_scale_ptr, x_zero_ptr, offs_m, offs_k, M, K, a_qmin, a_qmax, QUANTIZE_X: tl.constexpr,
                DTYPE: tl.constexpr):
    """fq_x(x)[m, k] (or x) for m in offs_m, k in offs_k, as an fp32 tile."""
    x, _ = _tile(x_ptr, offs_m, offs_k, M, K)
    if QUANTIZE_X:
        scale, zero_point, inv = _token_qparams(x_scale_ptr, x_zero_ptr, offs_m, M)
        x = _fake_quantized(x, scale, zero_point, inv, a_qmin, a_qmax, DTYPE)
    return x


@triton.jit
def _fake_quant_matmul_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, group, a_qmin,
                              a_qmax, w_qmin, w_qmax, M, N, K, m_bucket, QUANTIZE_X: tl.constexpr,
                              QUANTIZE_W: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                              FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    """out (M, N) = fq_x(x) @ fq_w(W)^T + bias."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _input_tile(x_ptr, x_scale_ptr, x_zero_ptr, offs_m, offs_k, M, K, a_qmin, a_qmax, QUANTIZE_X, DTYPE)
        w = _weight_tile(w_ptr, w_scale_ptr, offs_n, offs_k, N, K, group, w_qmin, w_qmax, QUANTIZE_W, DTYPE)
        acc = _dot(x.to(DTYPE), tl.trans(w).to(DTYPE), acc, INTERPRET_BF16, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    _store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc, (offs_m[:, None] < M) & (offs_n[None, :] < N), DTYPE)


@triton.jit
def _fake_quant_matmul_grad_x_kernel(dy_ptr, w_ptr, x_ptr, dx_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, group,
                                     a_qmin, a_qmax, w_qmin, w_qmax, M, N, K, m_bucket, QUANTIZE_X: tl.constexpr,
                                     QUANTIZE_W: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                                     FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr):
    """dx (M, K) = STE_x(dy @ fq_w(W)): the product rounded to x's dtype, then fq_x's straight-through gradient."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy, _ = _tile(dy_ptr, offs_m, offs_n, M, N)
        w = _weight_tile(w_ptr, w_scale_ptr, offs_n, offs_k, N, K, group, w_qmin, w_qmax, QUANTIZE_W, DTYPE)
        acc = _dot(dy.to(DTYPE), w.to(DTYPE), acc, INTERPRET_BF16, FP32_PRECISION)
    grad = _in_dtype(acc, DTYPE)
    mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    if QUANTIZE_X:
        x, _ = _tile(x_ptr, offs_m, offs_k, M, K)
        scale, zero_point, inv = _token_qparams(x_scale_ptr, x_zero_ptr, offs_m, M)
        grad = _straight_through(grad, x, scale, zero_point, inv, a_qmin, a_qmax, DTYPE)
    _store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], grad, mask, DTYPE)


@triton.jit
def _fake_quant_matmul_grad_w_kernel(dy_ptr, x_ptr, w_ptr, dw_ptr, x_scale_ptr, x_zero_ptr, w_scale_ptr, group,
                                     a_qmin, a_qmax, w_qmin, w_qmax, M, N, K, m_bucket, QUANTIZE_X: tl.constexpr,
                                     QUANTIZE_W: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                                     FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                     BLOCK_K: tl.constexpr):
    """dW (N, K) = STE_w(dy^T @ fq_x(x)): the product rounded to W's dtype, then fq_w's straight-through gradient."""
    DTYPE: tl.constexpr = x_ptr.dtype.element_ty
    offs_n = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        dy, _ = _tile(dy_ptr, offs_m, offs_n, M, N)
        x = _input_tile(x_ptr, x_scale_ptr, x_zero_ptr, offs_m, offs_k, M, K, a_qmin, a_qmax, QUANTIZE_X, DTYPE)
        acc = _dot(tl.trans(dy).to(DTYPE), x.to(DTYPE), acc, INTERPRET_BF16, FP32_PRECISION)
    grad = _in_dtype(acc, DTYPE)
    mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
    if QUANTIZE_W:
        w, _ = _tile(w_ptr, offs_n, offs_k, N, K)
        scale, inv = _group_qparams(w_scale_ptr, offs_n, offs_k, N, K, group)
        grad = _straight_through(grad, w, scale, 0.0, inv, w_qmin, w_qmax, DTYPE)
    _store(dw_ptr + offs_n[:, None] * K + offs_k[None, :], grad, mask, DTYPE)


# Tiles of the fused fake-quant GEMMs (all three share the list; the operands are fake-quantized in registers, so
# a stage holds two (64 or 128) x 64 tiles of x's dtype). Half types take 4 warps (8 for the larger tiles; 128 x 128
# spills on sm_80); fp32 (TF32x3 holds each operand twice) takes 8 warps, 64 x 64 x 32 tiles and 2 stages
# (64-deep fp32 tiles spill on sm_80; 3 stages of them need 160 KB, too close to its 163 KB).
_CONFIGS = [config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
            config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
            config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
            config(8, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)]


def _fits(c: triton.Config, x_ptr, **_) -> bool:
    area = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"]
    if x_ptr.dtype == torch.float32:
        return c.num_warps == 8 and area == 64 * 64 and c.num_stages == 2
    return (c.num_warps == 4 or area > 64 * 64) and c.num_stages == 3


def _heuristic(x_ptr, **_) -> triton.Config:
    return _CONFIGS[3] if x_ptr.dtype == torch.float32 else _CONFIGS[0]


_KEY = ["m_bucket", "N", "K"]
TUNED_MATMUL = Tuned(_fake_quant_matmul_kernel, _CONFIGS, _KEY, _heuristic, _fits)
TUNED_GRAD_X = Tuned(_fake_quant_matmul_grad_x_kernel, _CONFIGS, _KEY, _heuristic, _fits)
TUNED_GRAD_W = Tuned(_fake_quant_matmul_grad_w_kernel, _CONFIGS, _KEY, _heuristic, _fits)


def qparams(x: torch.Tensor, group: int, qmin: float, qmax: float, symmetric: bool, eps: float):
    """(scale, zero point), fp32 (numel / group,) each, of contiguous x's groups of `group` elements."""
    n_groups = x.numel() // group
    scale = torch.empty(n_groups, dtype=torch.float32, device=x.device)
    zero_point = torch.empty_like(scale)
    grid, blocks = _group_launch(n_groups, group)
    _qparams_kernel[grid](x, scale, zero_point, n_groups, group, float(qmin), float(qmax), float(eps),
                          SYMMETRIC=symmetric, **blocks)
    return scale, zero_point


class FakeQuantOperands:
    """x (M, K) and W (N, K), contiguous, one dtype, with the qparams of what is fake-quantized: x per token
    (x_range = (qmin, qmax)) and W per group of `group` (w_range), None for an operand used as it is."""

    def __init__(self, x, weight, group, x_range, w_range, eps):
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or weight.dtype != x.dtype:
            raise TypeError(f"x and weight must share one dtype of float32, float16, bfloat16, got {x.dtype} and "
                            f"{weight.dtype}")
        self.x, self.weight, self.group = x, weight, group
        (self.M, self.K), self.N = x.shape, weight.shape[0]
        self.x_range, self.w_range = x_range or (0.0, 0.0), w_range or (0.0, 0.0)
        self.x_params = qparams(x, self.K, *x_range, False, eps) if x_range else (x, x)
        self.w_scale = qparams(weight, group, *w_range, True, eps)[0] if w_range else weight
        self.flags = dict(QUANTIZE_X=x_range is not None, QUANTIZE_W=w_range is not None,
                          INTERPRET_BF16=_INTERPRET and x.dtype == torch.bfloat16)

    def launch(self, tuned: Tuned, grid, tensors, **flags):
        """grid(rows, cols): the launch grid for a configuration's (BLOCK_x, BLOCK_y) of the output's two sides."""
        sizes = dict(M=self.M, N=self.N, K=self.K, m_bucket=min(256, max(16, triton.next_power_of_2(self.M))))
        tuned.launch(grid, (*tensors, *self.x_params, self.w_scale, self.group, *self.x_range, *self.w_range), sizes,
                     self.x.device, **self.flags, **flags, FP32_PRECISION=fp32_precision(), enable_fp_fusion=False)


def fake_quant_matmul(ops: FakeQuantOperands, bias) -> torch.Tensor:
    """fq_x(x) @ fq_w(W)^T + bias, (M, N) in x's dtype."""
    out = torch.empty((ops.M, ops.N), dtype=ops.x.dtype, device=ops.x.device)
    grid = lambda meta: (triton.cdiv(ops.M, meta["BLOCK_M"]), triton.cdiv(ops.N, meta["BLOCK_N"]))  # noqa: E731
    ops.launch(TUNED_MATMUL, grid, (ops.x, ops.weight, bias if bias is not None else ops.x, out),
               HAS_BIAS=bias is not None)
    return out


def fake_quant_matmul_grad_x(ops: FakeQuantOperands, dy: torch.Tensor) -> torch.Tensor:
    """STE_x(dy @ fq_w(W)), (M, K); dy (M, N) contiguous in x's dtype."""
    dx = torch.empty_like(ops.x)
    grid = lambda meta: (triton.cdiv(ops.M, meta["BLOCK_M"]), triton.cdiv(ops.K, meta["BLOCK_K"]))  # noqa: E731
    ops.launch(TUNED_GRAD_X, grid, (dy, ops.weight, ops.x, dx))
    return dx


def fake_quant_matmul_grad_w(ops: FakeQuantOperands, dy: torch.Tensor) -> torch.Tensor:
    """STE_w(dy^T @ fq_x(x)), (N, K); dy (M, N) contiguous in x's dtype."""
    dw = torch.empty_like(ops.weight)
    grid = lambda meta: (triton.cdiv(ops.N, meta["BLOCK_N"]), triton.cdiv(ops.K, meta["BLOCK_K"]))  # noqa: E731
    ops.launch(TUNED_GRAD_W, grid, (dy, ops.x, ops.weight, dw))
    return dw
