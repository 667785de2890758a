"""Triton kernels for packed 4-bit (NF4/FP4) weights: dequantize, x @ W^T and dy @ W with dequantization of each
W tile in the GEMM's prologue, so the dense weight never exists in global memory.

Layout (bitsandbytes): element e of the row-major flattened W is nibble (e % 2 == 0 ? high : low) of byte e // 2,
scaled by absmax[e // blocksize] (with double quant: nested_code[q] * nested_absmax[b // 256] + offset).

Decoding a W tile (ROWS path: K even and a multiple of the blocksize, every real model's weights):
- the tile's BLOCK_N x BLOCK_K / 2 code bytes are one row-major tile load (contiguous along K: vectorized, 16 bytes a
  thread when K is a multiple of 32), the only large load per W tile, and what the software pipeline stages in
  shared memory (BLOCK_N * BLOCK_K / 2 bytes a stage);
- the 16-entry code table is loaded once per program into registers and resolved with `tl.gather` (a 64-byte
  table per row of threads, no global gathers);
- absmax: one value per (row, block) of the tile, BLOCK_N * max(1, BLOCK_K / blocksize) loads per tile, broadcast
  over the block's elements; with double quantization the nested code and nested absmax are resolved on that small
  tile too, never per element;
- high/low nibbles are interleaved in registers (tl.join), scaled, rounded to the activation dtype and fed to
  tl.dot. No FMA contraction anywhere in the decode (the kernels launch with enable_fp_fusion=False), so the
  decoded W is bit for bit the reference's (fastft/reference/nf4.py).
Other shapes (odd K, or K not a multiple of the blocksize: blocks straddle rows) take the ELEMENTS path: the flat
index of every element, its byte and absmax gathered per element; correct for any shape, slower, 2 stages.

Roofline of one call, (M, N, K) = tokens x out_features x in_features, nested (double-quant) weight, b = blocksize:
- FLOPs: 2 M N K (tensor cores: bf16/fp16 as is; fp32 as TF32, see fastft.kernels.common).
- bytes: x read once per N-tile: M K s (N / BLOCK_N) from L2, M K s from HBM (s = 2 for bf16); y written M N s;
  W codes N K / 2 + absmax N K / b read once per M-tile from L2, once from HBM.
  HBM total ~ M K s + M N s + N K (1/2 + 1/b).
- decode: per W element and M-tile ~6 instructions (shift/mask, gather, multiply, convert), on CUDA cores.
For Llama-8B's MLP up projection (M = 4096, N = 14336, K = 4096, bf16): 481 GFLOP, 180 MB of HBM traffic: ~0.6 ms
at an H100 SXM's ~800 TFLOP/s of dense bf16 reachable by Triton (compute-bound; intensity 2700 FLOP/byte), plus the
decode (M / BLOCK_M = 32 tiles x 58.7 M elements x ~6 instructions = 11 G instructions, ~0.3 ms of the CUDA cores'
~33 T/s, overlapping with the MMAs). Decode shapes (M = 1..16): memory-bound, N K / 2 + N K / 64 bytes: 30 MB, ~10 us
at 3 TB/s.

Launch configurations: `TUNED_MATMUL` / `TUNED_GRAD_INPUT` (fastft.kernels.common.Tuned): an autotune list keyed on
(M bucket, N, K) and the heuristic `_heuristic` used when autotuning is off.
"""

from __future__ import annotations

import triton
import triton.language as tl
import torch

from fastft.kernels.common import _INTERPRET, Tuned, _dot, _to_bf16_rtne, _to_dtype, config, fp32_precision


@triton.jit
def _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, block, mask, nested_blocksize,
                  NESTED: tl.constexpr):
    """fp32 scale of the blocks `block` (int64, any tile shape): absmax, or nested_code[q] * nested_absmax + offset."""
    if NESTED:
        q = tl.load(absmax_ptr + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(nested_code_ptr + q, mask=mask, other=0.0) * tl.load(
            nested_absmax_ptr + block // nested_blocksize, mask=mask, other=0.0)
        scale = scale + nested_offset
    else:
        scale = tl.load(absmax_ptr + block, mask=mask, other=0.0)
    return scale


@triton.jit
def _dequantize_elements(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, elem,
                         mask, blocksize, nested_blocksize, NESTED: tl.constexpr):
    """fp32 values of the flat elements `elem` (int64, any tile shape), gathered one by one (ELEMENTS path)."""
    byte = tl.load(packed_ptr + elem // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(elem % 2 == 0, byte >> 4, byte & 0xF)
    value = tl.load(code_ptr + nibble, mask=mask, other=0.0)
    scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, elem // blocksize, mask,
                          nested_blocksize, NESTED)
    return value * scale


@triton.jit
def _decode_bytes(byte, code):
    """The two fp32 code values of each byte of the int32 tile `byte` (R, C), interleaved: (R, 2 C), element 2 j the
    high nibble of byte j. `code` is the (16,) table in registers."""
    table = tl.broadcast_to(code[None, :], (byte.shape[0], 16))
    high = tl.gather(table, byte >> 4, axis=1)
    low = tl.gather(table, byte & 0xF, axis=1)
    return tl.reshape(tl.join(high, low), (byte.shape[0], 2 * byte.shape[1]))


@triton.jit
def _weight_rows(packed_ptr, absmax_ptr, code, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, offs_n,
                 k0, N, K, row_bytes, blocksize, nested_blocksize, NESTED: tl.constexpr, ROWS: tl.constexpr,
                 BLOCKSIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """fp32 W[offs_n, k0:k0 + BLOCK_K] (0 outside W), a (BLOCK_N, BLOCK_K) tile; offs_n int64."""
    if ROWS:
        cols = k0 // 2 + tl.arange(0, BLOCK_K // 2)
        row_ok = offs_n < N
        byte = tl.load(packed_ptr + offs_n[:, None] * row_bytes + cols[None, :],
                       mask=row_ok[:, None] & (cols[None, :] < row_bytes), other=0).to(tl.int32)
        values = _decode_bytes(byte, code)
        SCALES: tl.constexpr = BLOCK_K // BLOCKSIZE if BLOCK_K > BLOCKSIZE else 1
        j = tl.arange(0, SCALES)
        block = offs_n[:, None] * (K // BLOCKSIZE) + (k0 // BLOCKSIZE + j)[None, :]
        scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, block,
                              row_ok[:, None] & (k0 + j * BLOCKSIZE < K)[None, :], nested_blocksize, NESTED)
        scaled = tl.reshape(values, (BLOCK_N, SCALES, BLOCK_K // SCALES)) * scale[:, :, None]
        w = tl.reshape(scaled, (BLOCK_N, BLOCK_K))
    else:
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask = (offs_n[:, None] < N) & (offs_k[None, :] < K)
        w = _dequantize_elements(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                                 offs_n[:, None] * K + offs_k[None, :], mask, blocksize, nested_blocksize, NESTED)
    return w


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                           out_ptr, numel, nested_blocksize, NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr,
                           BLOCK: tl.constexpr):
    """BLOCK consecutive elements per program as a (SCALES, ROW) tile, one quantization block per row (or the whole
    BLOCK in one row when a block is longer): ROW / 2 bytes per row in one vectorized load, one scale per row."""
    SCALES: tl.constexpr = BLOCK // BLOCKSIZE if BLOCK > BLOCKSIZE else 1
    ROW: tl.constexpr = BLOCK // SCALES
    j = tl.arange(0, SCALES)
    row_start = tl.program_id(0).to(tl.int64) * BLOCK + j * ROW
    byte_index = row_start[:, None] // 2 + tl.arange(0, ROW // 2)[None, :]
    byte = tl.load(packed_ptr + byte_index, mask=byte_index * 2 < numel, other=0).to(tl.int32)
    code = tl.load(code_ptr + tl.arange(0, 16))
    scale = _block_scales(absmax_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset, row_start // BLOCKSIZE,
                          row_start < numel, nested_blocksize, NESTED)
    values = _decode_bytes(byte, code) * scale[:, None]
    elem = row_start[:, None] + tl.arange(0, ROW)[None, :]
    mask = elem < numel
    if out_ptr.dtype.element_ty == tl.bfloat16:
        tl.store(out_ptr + elem, _to_bf16_rtne(values), mask=mask)
    else:
        tl.store(out_ptr + elem, values.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_linear_kernel(x_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                       bias_ptr, y_ptr, row_bytes, blocksize, nested_blocksize, M, N, K, m_bucket,
                       NESTED: tl.constexpr, ROWS: tl.constexpr, BLOCKSIZE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[M, N] = x[M, K] @ W[N, K]^T (+ bias): one (BLOCK_M, BLOCK_N) tile of y per program. m_bucket: the tuning
    key's M bucket (unused in the kernel)."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    code = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :], mask=(offs_m[:, None] < M) & (offs_k[None, :] < K),
                    other=0.0)
        w = _weight_rows(packed_ptr, absmax_ptr, code, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                         offs_n, k0, N, K, row_bytes, blocksize, nested_blocksize, NESTED, ROWS, BLOCKSIZE, BLOCK_N,
                         BLOCK_K)
        acc = _dot(x, tl.trans(_to_dtype(w, x.dtype, INTERPRET_BF16)), acc, INTERPRET_BF16, FP32_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y_mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    y = _to_dtype(acc, y_ptr.dtype.element_ty, INTERPRET_BF16)
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], y, mask=y_mask)


@triton.jit
def _nf4_linear_grad_input_kernel(dy_ptr, packed_ptr, absmax_ptr, code_ptr, nested_absmax_ptr, nested_code_ptr,
                                  nested_offset, dx_ptr, row_bytes, blocksize, nested_blocksize, M, N, K, m_bucket,
                                  NESTED: tl.constexpr, ROWS: tl.constexpr, BLOCKSIZE: tl.constexpr,
                                  INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dx[M, K] = dy[M, N] @ W[N, K]: one (BLOCK_M, BLOCK_K) tile of dx per program, looping over N."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k0 = tl.program_id(1) * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    code = tl.load(code_ptr + tl.arange(0, 16))
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
        dy = tl.load(dy_ptr + offs_m[:, None] * N + offs_n[None, :],
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N), other=0.0)
        w = _weight_rows(packed_ptr, absmax_ptr, code, code_ptr, nested_absmax_ptr, nested_code_ptr, nested_offset,
                         offs_n, k0, N, K, row_bytes, blocksize, nested_blocksize, NESTED, ROWS, BLOCKSIZE, BLOCK_N,
                         BLOCK_K)
        acc = _dot(dy, _to_dtype(w, dy.dtype, INTERPRET_BF16), acc, INTERPRET_BF16, FP32_PRECISION)
    dx_mask = (offs_m[:, None] < M) & (offs_k[None, :] < K)
    dx = _to_dtype(acc, dx_ptr.dtype.element_ty, INTERPRET_BF16)
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :], dx, mask=dx_mask)


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def _check_dtype(name: str, t: torch.Tensor) -> None:
    if t.dtype not in _SUPPORTED:
        raise TypeError(f"{name} must be float32, float16 or bfloat16 for the Triton kernels, got {t.dtype}")


def m_bucket(rows: int) -> int:
    """The tuning key's M: 16, 32, 64, 128 or 256 and above (one tuning per bucket, not per token count)."""
    return min(256, max(16, triton.next_power_of_2(rows)))


# 64-row and 128-row tiles are warpgroup-MMA sized on sm_90 (wgmma m64, 4 warps per warpgroup); narrow tiles serve
# decode-like shapes. Half-precision activations take 4-warp tiles (8 for 128 rows); fp32 activations take 8 warps,
# at most 64 rows and a 32-deep reduction (BLOCK_K of the forward, BLOCK_N of grad_input): TF32x3 holds each operand
# twice (high and low parts), and deeper or taller tiles spill on sm_80. Shared memory (ptxas): at most ~110 KB,
# within A100's 163 KB.
_MATMUL_CONFIGS = [config(4, 4, BLOCK_M=16, BLOCK_N=128, BLOCK_K=128),
                   config(4, 4, BLOCK_M=32, BLOCK_N=128, BLOCK_K=64),
                   config(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
                   config(4, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128),
                   config(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
                   config(8, 3, BLOCK_M=16, BLOCK_N=128, BLOCK_K=32),
                   config(8, 3, BLOCK_M=32, BLOCK_N=128, BLOCK_K=32),
                   config(8, 3, BLOCK_M=64, BLOCK_N=128, BLOCK_K=32),
                   config(8, 3, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)]
_GRAD_INPUT_CONFIGS = [config(4, 4, BLOCK_M=16, BLOCK_N=64, BLOCK_K=128),
                       config(4, 4, BLOCK_M=32, BLOCK_N=64, BLOCK_K=128),
                       config(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128),
                       config(8, 3, BLOCK_M=128, BLOCK_N=64, BLOCK_K=128),
                       config(8, 3, BLOCK_M=16, BLOCK_N=32, BLOCK_K=128),
                       config(8, 3, BLOCK_M=32, BLOCK_N=32, BLOCK_K=128),
                       config(8, 3, BLOCK_M=64, BLOCK_N=32, BLOCK_K=128)]
# The ELEMENTS path (odd K, or blocks straddling rows) gathers fp32 tiles per element: 2 stages, 8 warps and 32-wide
# tiles for every dtype (4-warp 64-wide tiles spill on its per-element index arithmetic, fp16 included).
_ELEMENTS_CONFIGS = [config(8, 2, BLOCK_M=16, BLOCK_N=32, BLOCK_K=32),
                     config(8, 2, BLOCK_M=32, BLOCK_N=32, BLOCK_K=32),
                     config(8, 2, BLOCK_M=64, BLOCK_N=32, BLOCK_K=32)]


def _activation(arguments) -> torch.Tensor:
    return arguments["x_ptr"] if "x_ptr" in arguments else arguments["dy_ptr"]


def _fits(c: triton.Config, m_bucket, **arguments) -> bool:
    """Autotune pruning: 8 warps and at most 64 rows for fp32 activations (128-row TF32x3 tiles spill on sm_80) and
    on the ELEMENTS path, 4 warps for half types below 128 rows; tiles no taller than twice the rows (decode shapes
    keep narrow tiles)."""
    fp32 = _activation(arguments).dtype == torch.float32 or not arguments.get("ROWS", True)
    block_m = c.kwargs["BLOCK_M"]
    warps_ok = c.num_warps == 8 and block_m <= 64 if fp32 else c.num_warps == (8 if block_m == 128 else 4)
    return warps_ok and block_m <= max(16, 2 * m_bucket) and (m_bucket > 32 or block_m <= 32)


def _heuristic(configs):
    def pick(m_bucket, **arguments) -> triton.Config:
        """Narrow M tiles for decode-like shapes (few rows), 64 up to 128 rows, 128 above (64 for the ELEMENTS
        path): the first configuration with that BLOCK_M that the pruning keeps."""
        block_m = 16 if m_bucket <= 16 else 32 if m_bucket <= 32 else 64 if m_bucket <= 128 else 128
        kept = [c for c in configs if _fits(c, 256, **arguments)]
        return next((c for c in kept if c.kwargs["BLOCK_M"] == block_m), kept[-1])
    return pick


_KEY = ["m_bucket", "N", "K"]
TUNED_MATMUL = Tuned(_nf4_linear_kernel, _MATMUL_CONFIGS, _KEY, _heuristic(_MATMUL_CONFIGS), _fits,
                     when={"ROWS": True})
TUNED_GRAD_INPUT = Tuned(_nf4_linear_grad_input_kernel, _GRAD_INPUT_CONFIGS, _KEY, _heuristic(_GRAD_INPUT_CONFIGS),
                         _fits, when={"ROWS": True})
TUNED_MATMUL_ELEMENTS = Tuned(_nf4_linear_kernel, _ELEMENTS_CONFIGS, _KEY, _heuristic(_ELEMENTS_CONFIGS), _fits,
                              when={"ROWS": False})
TUNED_GRAD_INPUT_ELEMENTS = Tuned(_nf4_linear_grad_input_kernel, _ELEMENTS_CONFIGS, _KEY,
                                  _heuristic(_ELEMENTS_CONFIGS), _fits, when={"ROWS": False})


def _weight_args(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset, K):
    """(tensor and scalar arguments, constexprs) of the packed weight W (N, K) as the GEMM kernels take it."""
    nested = nested_absmax is not None
    rows = K % 2 == 0 and K % blocksize == 0
    tensors = (packed, absmax, code, nested_absmax if nested else absmax, nested_code if nested else absmax,
               float(nested_offset))
    return tensors, (K // 2, blocksize, nested_blocksize), dict(NESTED=nested, ROWS=rows, BLOCKSIZE=blocksize)


def nf4_dequantize(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset,
                   shape, dtype, out=None) -> torch.Tensor:
    """The dense weight of `shape` in `dtype`, written into `out` (contiguous) if given. Bit-exact: no FMA
    contraction in this kernel. Bytes: numel / 2 + 4 numel / blocksize read, numel * itemsize written."""
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=packed.device)
    numel = out.numel()
    nested = nested_absmax is not None
    block = 1024
    _nf4_dequantize_kernel[(triton.cdiv(numel, block),)](
        packed, absmax, code, nested_absmax if nested else absmax, nested_code if nested else absmax,
        float(nested_offset), out, numel, nested_blocksize, NESTED=nested, BLOCKSIZE=blocksize, BLOCK=block,
        enable_fp_fusion=False)
    return out


def nf4_linear(x, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset,
               out_features, bias) -> torch.Tensor:
    """y = x @ W^T (+ bias) for contiguous x (M, K); y (M, out_features) in x's dtype."""
    _check_dtype("x", x)
    M, K = x.shape
    N = out_features
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    tensors, scalars, flags = _weight_args(packed, absmax, code, blocksize, nested_absmax, nested_code,
                                           nested_blocksize, nested_offset, K)
    (TUNED_MATMUL if flags["ROWS"] else TUNED_MATMUL_ELEMENTS).launch(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(N, meta["BLOCK_N"])),
        (x, *tensors, bias if bias is not None else x, y, *scalars), dict(M=M, N=N, K=K, m_bucket=m_bucket(M)),
        x.device, HAS_BIAS=bias is not None, INTERPRET_BF16=_INTERPRET and x.dtype == torch.bfloat16,
        FP32_PRECISION=fp32_precision(), enable_fp_fusion=False, **flags)
    return y


def nf4_linear_grad_input(grad_out, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize,
                          nested_offset, in_features) -> torch.Tensor:
    """dx = dy @ W for contiguous dy (M, N); dx (M, in_features) in dy's dtype."""
    _check_dtype("grad_out", grad_out)
    M, N = grad_out.shape
    K = in_features
    dx = torch.empty((M, K), dtype=grad_out.dtype, device=grad_out.device)
    tensors, scalars, flags = _weight_args(packed, absmax, code, blocksize, nested_absmax, nested_code,
                                           nested_blocksize, nested_offset, K)
    (TUNED_GRAD_INPUT if flags["ROWS"] else TUNED_GRAD_INPUT_ELEMENTS).launch(
        lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"])),
        (grad_out, *tensors, dx, *scalars), dict(M=M, N=N, K=K, m_bucket=m_bucket(M)), grad_out.device,
        INTERPRET_BF16=_INTERPRET and grad_out.dtype == torch.bfloat16, FP32_PRECISION=fp32_precision(),
        enable_fp_fusion=False, **flags)
    return dx
