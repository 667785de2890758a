"""Triton kernels of per-sample routed LoRA (formula: fastft/reference/routed_lora.py): a batch of M rows, row m
through adapter route[m] (or none, -1), all adapters in one launch per pass.

The rows are grouped by adapter once per call: a stable sort of the route gives `order` (sorted position ->
row), adapter g owns positions [segments[g], segments[g+1]), and a tile table lists, for each tile of BLOCK_M
positions inside one segment, (adapter, first position, segment end). No tile straddles two adapters, so every
tile runs one adapter's rank-r GEMMs on tensor cores; x, dy, delta and dx are read and written at their rows
through `order` (no gathered copy). The adapters arrive concatenated: A_cat (R, K), B_cat (N, R), adapter g
owning ranks [rank_offsets[g], rank_offsets[g+1]); BLOCK_R is the largest rank rounded up to a power of two (>= 16).
- _routed_lora_kernel (forward), one program per tile: U = scale_g (x_rows A_g^T) in fp32, rounded to A's
  dtype, then delta_rows = U B_g^T block by block over N. Reads x once and A_g, B_g per tile; writes delta once.
- _routed_lora_rows_kernel (backward), one program per tile: U and dU = scale_g dy_rows B_g recomputed from x and
  dy, stored per sorted position (M x BLOCK_R each, A's dtype: the weight-gradient kernel reads them), and
  dx_rows = dU A_g when asked for.
- _routed_lora_grad_w_kernel (backward), one program per (adapter, block of BLOCK_C columns): the segment's sum of
  outer products, dA_g^T = x_g^T dU_g (C = K) or dB_g = dy_g^T (scale_g U_g) (C = N), fp32 accumulation, over the
  segment's rows in BLOCK_M steps. Empty adapters get zeros.
Roofline (M rows, K in, N out, r ranks, s bytes per element): forward 2 M r (K + N) FLOPs, M (K + N) s bytes plus
the tiles' reads of A_g, B_g (L2-resident); backward 4 M r (K + N) FLOPs and M (K + 2 N) s + 2 M r s bytes, plus
dx's M K s. Memory-bound at every rank (as kernels/lora.py): M = 4096, K = N = 4096, bf16: ~2 x 34 MB forward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from fastft.kernels.common import _INTERPRET, _dot, _to_dtype, fp32_precision

_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _tile(tiles_ptr, rank_offsets_ptr, scales_ptr, order_ptr, BLOCK_M: tl.constexpr):
    """This program's tile: (rows through order, their mask, sorted positions, rank offset, rank, scale)."""
    t = tl.program_id(0)
    g = tl.load(tiles_ptr + 3 * t)
    start = tl.load(tiles_ptr + 3 * t + 1)
    end = tl.load(tiles_ptr + 3 * t + 2)
    r0 = tl.load(rank_offsets_ptr + g)
    rank = tl.load(rank_offsets_ptr + g + 1) - r0
    pos = start + tl.arange(0, BLOCK_M)
    ok = pos < end
    rows = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
    return rows, ok, pos.to(tl.int64), r0, rank, tl.load(scales_ptr + g)


@triton.jit
def _down(x_ptr, a_ptr, rows, ok, r0, rank, K, INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """x_rows (in A's dtype) @ A_g^T: (BLOCK_M, BLOCK_R) fp32, columns past the rank 0."""
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + rows[:, None] * K + offs_k[None, :], mask=ok[:, None] & (offs_k[None, :] < K), other=0.0)
        x = _to_dtype(x.to(tl.float32), a_ptr.dtype.element_ty, INTERPRET_BF16)
        a = tl.load(a_ptr + (r0 + offs_r).to(tl.int64)[None, :] * K + offs_k[:, None],
                    mask=(offs_r[None, :] < rank) & (offs_k[:, None] < K), other=0.0)
        acc = _dot(x, a, acc, INTERPRET_BF16, FP32_PRECISION)
    return acc


@triton.jit
def _routed_lora_kernel(x_ptr, a_ptr, b_ptr, out_ptr, order_ptr, tiles_ptr, rank_offsets_ptr, scales_ptr, K, N, R,
                        INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, ok, pos, r0, rank, scale = _tile(tiles_ptr, rank_offsets_ptr, scales_ptr, order_ptr, BLOCK_M)
    u = _down(x_ptr, a_ptr, rows, ok, r0, rank, K, INTERPRET_BF16, FP32_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    u = _to_dtype(u * scale, a_ptr.dtype.element_ty, INTERPRET_BF16)
    offs_r = tl.arange(0, BLOCK_R)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[None, :] * R + (r0 + offs_r)[:, None],
                    mask=(offs_r[:, None] < rank) & (offs_n[None, :] < N), other=0.0)
        y = _dot(u, b, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), INTERPRET_BF16, FP32_PRECISION)
        tl.store(out_ptr + rows[:, None] * N + offs_n[None, :], _to_dtype(y, out_ptr.dtype.element_ty, INTERPRET_BF16),
                 mask=ok[:, None] & (offs_n[None, :] < N))


@triton.jit
def _routed_lora_rows_kernel(x_ptr, dy_ptr, a_ptr, b_ptr, us_ptr, dus_ptr, dx_ptr, order_ptr, tiles_ptr,
                             rank_offsets_ptr, scales_ptr, K, N, R, WANT_X: tl.constexpr,
                             INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    rows, ok, pos, r0, rank, scale = _tile(tiles_ptr, rank_offsets_ptr, scales_ptr, order_ptr, BLOCK_M)
    a_dtype = a_ptr.dtype.element_ty
    offs_r = tl.arange(0, BLOCK_R)
    u = _down(x_ptr, a_ptr, rows, ok, r0, rank, K, INTERPRET_BF16, FP32_PRECISION, BLOCK_M, BLOCK_R, BLOCK_K)
    du = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        dy = tl.load(dy_ptr + rows[:, None] * N + offs_n[None, :], mask=ok[:, None] & (offs_n[None, :] < N),
                     other=0.0)
        b = tl.load(b_ptr + offs_n.to(tl.int64)[:, None] * R + (r0 + offs_r)[None, :],
                    mask=(offs_r[None, :] < rank) & (offs_n[:, None] < N), other=0.0)
        du = _dot(dy, b, du, INTERPRET_BF16, FP32_PRECISION)
    du = _to_dtype(du * scale, a_dtype, INTERPRET_BF16)
    buffer = pos[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(us_ptr + buffer, _to_dtype(u * scale, a_dtype, INTERPRET_BF16), mask=ok[:, None])
    tl.store(dus_ptr + buffer, du, mask=ok[:, None])
    if WANT_X:
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + (r0 + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :],
                        mask=(offs_r[:, None] < rank) & (offs_k[None, :] < K), other=0.0)
            dx = _dot(du, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), INTERPRET_BF16, FP32_PRECISION)
            tl.store(dx_ptr + rows[:, None] * K + offs_k[None, :],
                     _to_dtype(dx, dx_ptr.dtype.element_ty, INTERPRET_BF16), mask=ok[:, None] & (offs_k[None, :] < K))


@triton.jit
def _routed_lora_grad_w_kernel(src_ptr, buf_ptr, out_ptr, order_ptr, segments_ptr, rank_offsets_ptr, C,
                               stride_c, stride_r, INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    g = tl.program_id(0)
    begin = tl.load(segments_ptr + g)
    end = tl.load(segments_ptr + g + 1)
    r0 = tl.load(rank_offsets_ptr + g)
    rank = tl.load(rank_offsets_ptr + g + 1) - r0
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_C, BLOCK_R), dtype=tl.float32)
    for p0 in range(begin, end, BLOCK_M):
        pos = p0 + tl.arange(0, BLOCK_M)
        ok = pos < end
        rows = tl.load(order_ptr + pos, mask=ok, other=0).to(tl.int64)
        src = tl.load(src_ptr + rows[None, :] * C + offs_c[:, None], mask=ok[None, :] & (offs_c[:, None] < C),
                      other=0.0)
        src = _to_dtype(src.to(tl.float32), buf_ptr.dtype.element_ty, INTERPRET_BF16)
        buf = tl.load(buf_ptr + pos.to(tl.int64)[:, None] * BLOCK_R + offs_r[None, :], mask=ok[:, None], other=0.0)
        acc = _dot(src, buf, acc, INTERPRET_BF16, FP32_PRECISION)
    tl.store(out_ptr + offs_c[:, None] * stride_c + (r0 + offs_r)[None, :] * stride_r,
             _to_dtype(acc, out_ptr.dtype.element_ty, INTERPRET_BF16),
             mask=(offs_c[:, None] < C) & (offs_r[None, :] < rank))


@dataclass
class Routing:
    """The grouping of one call: order (M,) int64 sorted position -> row (rows of route -1 first, never read),
    segments (G + 1,) int32 and tiles (T, 3) int32 (adapter, first position, segment end) for BLOCK_M-row tiles;
    `unrouted`: whether some row has route -1 (its delta and dx are 0)."""
    order: torch.Tensor
    segments: torch.Tensor
    tiles: torch.Tensor
    block_m: int
    unrouted: bool

    @staticmethod
    def of(route: torch.Tensor, count: int, block_m: int) -> "Routing":
        order = torch.argsort(route, stable=True)
        counts = torch.bincount(route + 1, minlength=count + 1)
        ends = torch.cumsum(counts, 0)  # ends[g + 1]: end of adapter g's segment
        per_adapter = (counts[1:] + block_m - 1) // block_m
        adapter = torch.repeat_interleave(torch.arange(count, device=route.device), per_adapter)
        first = torch.cumsum(per_adapter, 0) - per_adapter
        start = ends[adapter] + (torch.arange(adapter.numel(), device=route.device) - first[adapter]) * block_m
        tiles = torch.stack([adapter, start, ends[adapter + 1]], dim=1).to(torch.int32).contiguous()
        return Routing(order, ends.to(torch.int32), tiles, block_m, bool(counts[0] > 0))


def block_r(ranks: list[int]) -> int:
    return max(16, triton.next_power_of_2(max(ranks)))


def block_m(rank_tile: int, dtype: torch.dtype) -> int:
    """Rows per tile, so that the (BLOCK_M, BLOCK_R) fp32 accumulators and their operands stay in registers (the
    compile check): 64; 32 for rank tiles over 64, or over 32 with fp32 adapters (TF32x3); 16 for fp32 over 64."""
    if dtype == torch.float32:
        return 64 if rank_tile <= 32 else 32 if rank_tile <= 64 else 16
    return 64 if rank_tile <= 64 else 32


def _tiles(dtype: torch.dtype, rank_tile: int) -> dict:
    """Feature tiles and warps: fp32 adapters (TF32x3: three MMAs and twice the operand registers) take 8 warps and,
    for rank tiles over 32, 32-wide feature tiles."""
    fp32 = dtype == torch.float32
    width = 32 if fp32 and rank_tile > 32 else 64
    return dict(BLOCK_K=width, BLOCK_N=width, num_warps=8 if fp32 else 4, num_stages=2)


def _flags(dtype: torch.dtype) -> dict:
    return dict(INTERPRET_BF16=_INTERPRET and dtype == torch.bfloat16, FP32_PRECISION=fp32_precision())


def _check(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if t.dtype not in _SUPPORTED:
            raise TypeError(f"routed LoRA kernels take tensors in {_SUPPORTED}, got {t.dtype}")


def routed_lora(x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor, rank_offsets: torch.Tensor,
                scales: torch.Tensor, routing: Routing, rank_tile: int) -> torch.Tensor:
    """delta (M, N) in A's dtype; x (M, K), A_cat (R, K), B_cat (N, R) contiguous, rank_offsets (G + 1,) int32,
    scales (G,) fp32."""
    _check(x, a_cat)
    (M, K), N, R = x.shape, b_cat.shape[0], a_cat.shape[0]
    out = (torch.zeros if routing.unrouted else torch.empty)((M, N), dtype=a_cat.dtype, device=x.device)
    if routing.tiles.shape[0] == 0:
        return out
    _routed_lora_kernel[(routing.tiles.shape[0],)](
        x, a_cat, b_cat, out, routing.order, routing.tiles, rank_offsets, scales, K, N, R, **_flags(a_cat.dtype),
        BLOCK_M=routing.block_m, BLOCK_R=rank_tile, **_tiles(a_cat.dtype, rank_tile))
    return out


def routed_lora_backward(dy: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                         rank_offsets: torch.Tensor, scales: torch.Tensor, routing: Routing, rank_tile: int,
                         want_x: bool) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(dx in x's dtype or None, dA_cat (R, K), dB_cat (N, R) in A's dtype) for dy (M, N) in A's dtype."""
    _check(x, a_cat, dy)
    (M, K), N, R = x.shape, b_cat.shape[0], a_cat.shape[0]
    us = torch.empty((M, rank_tile), dtype=a_cat.dtype, device=x.device)
    dus = torch.empty_like(us)
    dx = (torch.zeros if routing.unrouted else torch.empty)((M, K), dtype=x.dtype, device=x.device) if want_x else us
    flags = _flags(a_cat.dtype)
    if routing.tiles.shape[0] == 0:
        return (dx if want_x else None), torch.zeros_like(a_cat), torch.zeros_like(b_cat)
    _routed_lora_rows_kernel[(routing.tiles.shape[0],)](
        x, dy, a_cat, b_cat, us, dus, dx, routing.order, routing.tiles, rank_offsets, scales, K, N, R,
        WANT_X=want_x, **flags, BLOCK_M=routing.block_m, BLOCK_R=rank_tile, **_tiles(a_cat.dtype, rank_tile))
    da = torch.empty((R, K), dtype=a_cat.dtype, device=x.device)
    db = torch.empty((N, R), dtype=a_cat.dtype, device=x.device)
    count = rank_offsets.shape[0] - 1
    warps = _tiles(a_cat.dtype, rank_tile)["num_warps"]
    width = _tiles(a_cat.dtype, rank_tile)["BLOCK_K"]  # BLOCK_C: (BLOCK_C, BLOCK_R) fp32 accumulators
    for src, buf, out, C, stride_c, stride_r in ((x, dus, da, K, 1, K), (dy, us, db, N, R, 1)):
        _routed_lora_grad_w_kernel[(count, triton.cdiv(C, width))](
            src, buf, out, routing.order, routing.segments, rank_offsets, C, stride_c, stride_r, **flags,
            BLOCK_M=routing.block_m, BLOCK_R=rank_tile, BLOCK_C=width, num_warps=warps, num_stages=2)
    return (dx if want_x else None), da, db
