"""Triton kernels of the bottleneck adapter: one tiled GEMM, C = A @ B, with three epilogues.

- DOWN:      z = A @ B + bias, a = act(z): the down-projection (A = norm(x) (M, H), B = W_down^T (H, r)); writes z
             (kept for backward) and a. Bytes: read x once per N-tile (one tile for r <= 64), write 2 * M * r.
- RESIDUAL:  out = R + scale * (A @ B + bias): the up-projection with the residual add (A = a (M, r),
             B = W_up^T (r, H)), and backward's dx = dy + dz @ W_down. Bytes: read R and write out once, 2 * M * H,
             where separate kernels would write the product and read it back (4 * M * H).
- ACT_GRAD:  dz = scale * (A @ B) * act'(z): the gradient at the pre-activation (A = dy (M, H), B = W_up (H, r)),
             with z read in the epilogue. Bytes: read dy once, read z and write dz (M * r each).
FLOPs: 2 * M * N * K each; fp32 operands on tensor cores as TF32 (fastft.kernels.common: precision, error bound).
Tiles: autotuned per (M bucket, N, K) from `_CONFIGS` (64 / 128-row tiles: warpgroup MMA on sm_90; r <= 64 fits one
N tile in DOWN and ACT_GRAD), the heuristic `_heuristic` when autotuning is off (interpreter, FASTFT_AUTOTUNE=0).
Roofline (M = 4096 tokens, H = 4096, r = 64, bf16, H100 ~3 TB/s, ~800 TFLOP/s): each GEMM is 2 M H r = 2.1 GFLOP
(~3 us of tensor cores) against 2 M H s = 67 MB of HBM for x / out (~22 us): memory-bound, time ~ bytes / bandwidth.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastft.kernels.common import _INTERPRET, Tuned, _dot, _to_dtype, config, fp32_precision

DOWN, RESIDUAL, ACT_GRAD = 0, 1, 2
_ACTIVATION_IDS = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}
_SQRT_2_OVER_PI = 0.7978845608028654


@triton.jit
def _activate(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return tl.maximum(z, 0.0)
    if ACTIVATION == 1:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    if ACTIVATION == 2:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        return 0.5 * z * (2.0 * tl.sigmoid(2.0 * u))  # 1 + tanh(u) = 2 * sigmoid(2u)
    return z * tl.sigmoid(z)


@triton.jit
def _activation_derivative(z, ACTIVATION: tl.constexpr):
    if ACTIVATION == 0:
        return tl.where(z > 0.0, 1.0, 0.0)
    if ACTIVATION == 1:
        return 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476)) + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)
    if ACTIVATION == 2:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    s = tl.sigmoid(z)
    return s * (1.0 + z * (1.0 - s))


@triton.jit
def _bottleneck_matmul_kernel(a_ptr, b_ptr, bias_ptr, r_ptr, z_ptr, out_ptr, stride_am, stride_ak, stride_bk,
                              stride_bn, stride_rm, scale, M, N, K, m_bucket, EPILOGUE: tl.constexpr,
                              ACTIVATION: tl.constexpr, HAS_BIAS: tl.constexpr, INTERPRET_BF16: tl.constexpr,
                              FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :] * stride_ak,
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        b = tl.load(b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn,
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0.0)
        acc = _dot(a, b, acc, INTERPRET_BF16, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    out_offsets = offs_m[:, None] * N + offs_n[None, :]
    dtype = out_ptr.dtype.element_ty
    if EPILOGUE == 0:
        z = _to_dtype(acc, dtype, INTERPRET_BF16)
        tl.store(z_ptr + out_offsets, z, mask=mask)
        tl.store(out_ptr + out_offsets, _to_dtype(_activate(z.to(tl.float32), ACTIVATION), dtype, INTERPRET_BF16),
                 mask=mask)
    elif EPILOGUE == 1:
        residual = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0)
        out = residual.to(tl.float32) + scale * acc
        tl.store(out_ptr + out_offsets, _to_dtype(out, dtype, INTERPRET_BF16), mask=mask)
    else:
        z = tl.load(z_ptr + out_offsets, mask=mask, other=0.0).to(tl.float32)
        grad = scale * acc * _activation_derivative(z, ACTIVATION)
        tl.store(out_ptr + out_offsets, _to_dtype(grad, dtype, INTERPRET_BF16), mask=mask)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


# Shared memory a stage: (BLOCK_M + BLOCK_N) * BLOCK_K * s <= (128 + 128) * 64 * 4 = 64 KB (fp32). Half types take
# 4 warps (8 for 128-row tiles); fp32 operands (TF32x3 holds each twice) take 8 warps and a 32-deep reduction
# (deeper fp32 tiles spill on sm_80).
_CONFIGS = [config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
            config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
            config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=64),
            config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
            config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128),
            config(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
            config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32)]


def _fits(c: triton.Config, N, a_ptr, **_) -> bool:
    """No N tile wider than needed (r <= 64: one 64-wide tile); warps and tile sizes by dtype (see `_CONFIGS`)."""
    block_m, block_n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
    if block_n > max(64, triton.next_power_of_2(N)):
        return False
    if a_ptr.dtype == torch.float32:
        return c.kwargs["BLOCK_K"] == 32
    return c.kwargs["BLOCK_K"] > 32 and (c.num_warps == 4 or block_m == 128)


def _heuristic(a_ptr, **_) -> triton.Config:
    return _CONFIGS[5] if a_ptr.dtype == torch.float32 else _CONFIGS[0]


TUNED = Tuned(_bottleneck_matmul_kernel, _CONFIGS, ["m_bucket", "N", "K"], _heuristic, _fits)


def _launch(a, b, out, epilogue, activation="relu", bias=None, residual=None, z=None, scale=1.0):
    if a.dtype not in _SUPPORTED or b.dtype != a.dtype:
        raise TypeError(f"bottleneck kernels take two operands of one dtype in {_SUPPORTED}, got {a.dtype}, {b.dtype}")
    M, K = a.shape
    N = b.shape[1]
    TUNED.launch(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
        (a, b, bias if bias is not None else a, residual if residual is not None else a, z if z is not None else out,
         out, a.stride(0), a.stride(1), b.stride(0), b.stride(1), residual.stride(0) if residual is not None else 0,
         float(scale)),
        dict(M=M, N=N, K=K, m_bucket=min(256, max(16, triton.next_power_of_2(M)))), a.device, EPILOGUE=epilogue,
        ACTIVATION=_ACTIVATION_IDS[activation], HAS_BIAS=bias is not None,
        INTERPRET_BF16=_INTERPRET and a.dtype == torch.bfloat16, FP32_PRECISION=fp32_precision())
    return out


def bottleneck_down(v: torch.Tensor, w_down: torch.Tensor, b_down, activation: str):
    """z = v @ W_down^T + b_down and a = act(z), both (M, r) in W_down's dtype; v (M, H) in W_down's dtype."""
    z = torch.empty((v.shape[0], w_down.shape[0]), dtype=w_down.dtype, device=v.device)
    a = torch.empty_like(z)
    _launch(v, w_down.t(), a, DOWN, activation, bias=b_down, z=z)
    return z, a


def residual_matmul(residual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias, scale: float) -> torch.Tensor:
    """residual + scale * (a @ b + bias): residual (M, N) with unit column stride, a (M, K), b (K, N) any strides;
    the result in residual's dtype."""
    out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    return _launch(a, b, out, RESIDUAL, bias=bias, residual=residual, scale=scale)


def activation_grad_matmul(dy: torch.Tensor, w_up: torch.Tensor, z: torch.Tensor, scale: float,
                           activation: str) -> torch.Tensor:
    """dz = scale * (dy @ W_up) * act'(z): dy (M, H) in W_up's dtype, W_up (H, r), z (M, r) contiguous."""
    dz = torch.empty_like(z)
    return _launch(dy, w_up, dz, ACT_GRAD, activation, z=z, scale=scale)
