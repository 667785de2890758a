"""Triton kernels for packed 4-bit (NF4/FP4) weights: dequantize, x @ W^T and dy @ W with dequantization of each
W tile in the GEMM's prologue, so the dense weight never exists in global memory.

Layout (bitsandbytes): element e of the row-major flattened W is nibble (e % 2 == 0 ? high : low) of byte e // 2,
scaled by absmax[e // blocksize] (with double quant: nested_code[q] * nested_absmax[b // 256] + offset).

Cost per W element, for an (M, N, K) GEMM: 0.5 byte of codes + 4/blocksize bytes of absmax read once per M-tile
(vs 2 bytes for a bf16 weight), 2*M FLOPs; the decode (shift, LUT gather from L1, scale) is ~5 integer/fp ops per
element per M-tile. Block sizes follow a fixed heuristic (`_tiles`) rather than autotuning, so the interpreter
runs one configuration.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_INTERPRET = triton.knobs.runtime.interpret if hasattr(triton, "knobs") else False


@triton.jit
def _dequantize_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, elem, mask,
                     blocksize, nested_blocksize, NESTED: tl.constexpr):
    """fp32 values of the flat elements `elem` (int64, any tile shape) of a packed 4-bit weight."""
    byte = tl.load(packed_ptr + elem // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(elem % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    block = elem // blocksize
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0)
        scale = scale + nested_offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _to_bf16_rtne(values):
    """fp32 -> bf16 rounded to nearest even with integer ops: the same bits on GPUs and in the interpreter
    (whose float cast truncates). Inputs are finite."""
    bits = values.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                           out_ptr, numel, blocksize, nested_blocksize, NESTED: tl.constexpr, BLOCK: tl.constexpr):
    elem = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = elem < numel
    values = _dequantize_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                              elem, mask, blocksize, nested_blocksize, NESTED)
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr + elem, _to_bf16_rtne(values), mask=mask)
    else:
        tl.store(out_ptr + elem, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _to_dtype(values, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    # The interpreter's fp32 -> bf16 cast truncates; round to nearest even as GPUs do.
    if INTERPRET_BF16:
        return _to_bf16_rtne(values)
    return values.to(dtype)


@triton.jit
def _dot(a, b, acc, INTERPRET_BF16: tl.constexpr):
    # fp32 operands use IEEE fp32 products (no TF32) to match the reference. The interpreter computes bf16
    # tl.dot wrongly: there the bf16 operands go through an fp32 dot (same products, fp32 accumulation).
    if INTERPRET_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _nf4_matmul_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                       bias_ptr, y_ptr, M, N, K, blocksize, nested_blocksize, NESTED: tl.constexpr,
                       HAS_BIAS: tl.constexpr, INTERPRET_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W[N, K]^T (+ bias): one (BLOCK_M, BLOCK_N) tile of y per program."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=x_mask, other=0.0)
        w_mask = (offs_k[:, None] < K) & (offs_n[None, :] < N)
        elem = offs_n[None, :] * K + offs_k[:, None]  # (BLOCK_K, BLOCK_N): W^T tile
        w = _dequantize_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                             elem, w_mask, blocksize, nested_blocksize, NESTED)
        acc = _dot(x, _to_dtype(w, x.dtype, INTERPRET_BF16), acc, INTERPRET_BF16)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = _to_dtype(acc, y_ptr.dtype.element_ty, INTERPRET_BF16)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y, mask=y_mask)


@triton.jit
def _nf4_matmul_grad_input_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                  nested_offset, dx_ptr, M, N, K, blocksize, nested_blocksize, NESTED: tl.constexpr,
                                  INTERPRET_BF16: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
    """dx[M, K] = dy[M, N] @ W[N, K]: one (BLOCK_M, BLOCK_K) tile of dx per program, looping over N."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1).to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :], mask=dy_mask, other=0.0)
        w_mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        elem = offs_n[:, None] * K + offs_k[None, :]
        w = _dequantize_tile(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                             elem, w_mask, blocksize, nested_blocksize, NESTED)
        acc = _dot(dy, _to_dtype(w, dy.dtype, INTERPRET_BF16), acc, INTERPRET_BF16)
    dx_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx = _to_dtype(acc, dx_ptr.dtype.element_ty, INTERPRET_BF16)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], dx, mask=dx_mask)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {t.dtype}")


def _block_m(rows: int) -> int:
    """Narrow M tiles for decode-like shapes (few rows), 64 otherwise; N/K tiles are 128 x 64."""
    return 16 if rows <= 16 else (32 if rows <= 32 else 64)


def _nested_args(absmax, nested_absmax, nested_code, nested_offset):
    nested = nested_absmax is not None
    return (nested_absmax if nested else absmax, nested_code if nested else absmax, float(nested_offset), nested)


def nf4_dequantize(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset,
                   shape, dtype, out=None) -> torch.Tensor:
    """The dense weight of `shape` in `dtype`, written into `out` (contiguous) if given. Bit-exact: no FMA
    contraction in this kernel."""
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    nested_absmax_arg, nested_code_arg, offset, nested = _nested_args(absmax, nested_absmax, nested_code,
                                                                      nested_offset)
    block = 1024
    _nf4_dequantize_kernel[(triton.cdiv(numel, block),)](
        packed, absmax, code, nested_absmax_arg, nested_code_arg, offset, out, numel, blocksize, nested_blocksize,
        NESTED=nested, BLOCK=block, enable_fp_fusion=False)
    return out


def nf4_matmul(x, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset,
               out_features, bias) -> torch.Tensor:
    """y = x @ W^T (+ bias) for contiguous x (M, K); y (M, out_features) in x's dtype."""
    _check_dtype("x", x)
    M, K = x.shape
    N = out_features
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    nested_absmax_arg, nested_code_arg, offset, nested = _nested_args(absmax, nested_absmax, nested_code,
                                                                      nested_offset)
    block_m, block_n, block_k = _block_m(M), 128, 64
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _nf4_matmul_kernel[grid](
        x, packed, absmax, code, nested_absmax_arg, nested_code_arg, offset, bias if bias is not None else x, y,
        M, N, K, blocksize, nested_blocksize, NESTED=nested, HAS_BIAS=bias is not None,
        INTERPRET_BF16=_INTERPRET and x.dtype == torch.bfloat16, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return y


def nf4_matmul_grad_input(grad_out, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize,
                          nested_offset, in_features) -> torch.Tensor:
    """dx = dy @ W for contiguous dy (M, N); dx (M, in_features) in dy's dtype."""
    _check_dtype("grad_out", grad_out)
    M, N = grad_out.shape
    K = in_features
    dx = torch.empty((M, K), dtype=grad_out.dtype, device=grad_out.device)
    nested_absmax_arg, nested_code_arg, offset, nested = _nested_args(absmax, nested_absmax, nested_code,
                                                                      nested_offset)
    block_m, block_n, block_k = _block_m(M), 64, 128
    grid = (triton.cdiv(M, block_m), triton.cdiv(K, block_k))
    _nf4_matmul_grad_input_kernel[grid](
        grad_out, packed, absmax, code, nested_absmax_arg, nested_code_arg, offset, dx, M, N, K, blocksize,
        nested_blocksize, NESTED=nested, INTERPRET_BF16=_INTERPRET and grad_out.dtype == torch.bfloat16,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return dx
