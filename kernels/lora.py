"""Triton kernels of LoRA: the counter-based dropout (see fastft/reference/lora.py for the mask's definition) and
the three rank-r GEMMs that read or write (tokens, in_features) tensors, with that dropout fused in, for a group of
adapters reading one x (several adapters of a layer, or the q/k/v projections of an attention block).

Adapter g of the group owns columns [offsets[g], offsets[g+1]) of u (M, R), rows of the concatenated A (R, K), and
its own seed. The dropout mask of adapter g over x (M, K) is regenerated tile by tile from (seed_g, m * K + k) and
never stored, nor is dropout(x):
- lora_down:   u[:, g] = dropout_g(x) @ A_g^T          reads x once per adapter of the group, writes u.
- lora_grad_x: dx = sum_g dropout_g(du_g @ A_g)         reads du (M x R), writes dx once: the group's sum in fp32.
- lora_grad_A: dA_g = du_g^T @ dropout_g(x)             reads x and du, writes dA (R x K); fp32 accumulation.
x may be half precision while A is fp32 (peft's fp32 adapters): x tiles are cast to A's dtype in registers, so no
fp32 copy of x exists. Tiles: 64 tokens x 64 features x the group's largest rank (rounded up to a power of two, >= 16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastft.kernels.nf4 import _INTERPRET, _dot, _to_dtype


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit(do_not_specialize=["seed_mix", "threshold"])
def _lora_dropout_kernel(x_ptr, out_ptr, numel, seed_mix, threshold, scale, BLOCK: tl.constexpr):
    # seed_mix and threshold arrive as i32 or i64 depending on their value: compare and mix as uint32.
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < numel
    low = (index & 0xFFFFFFFF).to(tl.uint32)
    high = (index >> 32).to(tl.uint32)
    h = _mix32(low ^ _mix32(high ^ seed_mix.to(tl.uint32)))
    x = tl.load(x_ptr + index, mask=mask, other=0.0)
    kept = tl.where(h >= threshold.to(tl.uint32), x.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + index, kept.to(out_ptr.dtype.element_ty), mask=mask)


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep / (1 - p) for contiguous x, the mask a function of (seed, flat index)."""
    from fastft.reference.lora import dropout_threshold, mix32

    out = torch.empty_like(x)
    seed_mix = int(mix32(torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64)))
    block = 1024
    _lora_dropout_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), seed_mix, dropout_threshold(p), 1.0 / (1.0 - p),
        BLOCK=block)
    return out


@triton.jit
def _dropout_keep(rows, cols, K, seed_mix):
    """The mask's hash of elements (rows[:, None], cols[None, :]) of a (M, K) tensor, as in _lora_dropout_kernel."""
    index = rows[:, None] * K + cols[None, :]
    low = (index & 0xFFFFFFFF).to(tl.uint32)
    high = (index >> 32).to(tl.uint32)
    return _mix32(low ^ _mix32(high ^ seed_mix))


@triton.jit
def _dropped_x_tile(x_ptr, offs_m, offs_k, M, K, seed_mix, threshold, keep_scale, a_dtype: tl.constexpr,
                    DROPOUT: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    """dropout(x.to(A's dtype)) on a (BLOCK_M, BLOCK_K) tile, rounded to A's dtype as the reference does."""
    x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
    x = _to_dtype(x.to(tl.float32), a_dtype, INTERPRET_BF16)
    if DROPOUT:
        keep = _dropout_keep(offs_m, offs_k, K, seed_mix) >= threshold
        x = _to_dtype(tl.where(keep, x.to(tl.float32) * keep_scale, 0.0), a_dtype, INTERPRET_BF16)
    return x


@triton.jit
def _adapter(seed_ptr, offsets_ptr, g):
    """Adapter g's first column in u / row in the concatenated A, its rank, and its mixed dropout seed."""
    r0 = tl.load(offsets_ptr + g)
    return r0, tl.load(offsets_ptr + g + 1) - r0, tl.load(seed_ptr + g).to(tl.uint32)


@triton.jit(do_not_specialize=["threshold"])
def _lora_down_kernel(x_ptr, a_ptr, u_ptr, seed_ptr, offsets_ptr, M, K, R, threshold, keep_scale,
                      DROPOUT: tl.constexpr, INTERPRET_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r0, rank, seed_mix = _adapter(seed_ptr, offsets_ptr, tl.program_id(1))
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = _dropped_x_tile(x_ptr, offs_m, offs_k, M, K, seed_mix, threshold.to(tl.uint32), keep_scale,
                            a_ptr.dtype.element_ty, DROPOUT, INTERPRET_BF16)
        a = tl.load(a_ptr + (r0 + offs_r).to(tl.int64)[None, :] * K + offs_k[:, None],
                    mask=(offs_r[None, :] < rank) & (offs_k[:, None] < K), other=0.0)
        acc = _dot(x, a, acc, INTERPRET_BF16)
    tl.store(u_ptr + offs_m[:, None] * R + (r0 + offs_r)[None, :],
             _to_dtype(acc, u_ptr.dtype.element_ty, INTERPRET_BF16),
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < rank))


@triton.jit(do_not_specialize=["threshold"])
def _lora_grad_x_kernel(du_ptr, a_ptr, dx_ptr, seed_ptr, offsets_ptr, M, K, R, n_adapters, threshold, keep_scale,
                        DROPOUT: tl.constexpr, INTERPRET_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for g in range(0, n_adapters):
        r0, rank, seed_mix = _adapter(seed_ptr, offsets_ptr, g)
        du = tl.load(du_ptr + offs_m[:, None] * R + (r0 + offs_r)[None, :],
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < rank), other=0.0)
        a = tl.load(a_ptr + (r0 + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :],
                    mask=(offs_r[:, None] < rank) & (offs_k[None, :] < K), other=0.0)
        grad = _dot(du, a, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), INTERPRET_BF16)
        if DROPOUT:
            keep = _dropout_keep(offs_m, offs_k, K, seed_mix) >= threshold.to(tl.uint32)
            grad = tl.where(keep, grad * keep_scale, 0.0)
        total += grad
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :],
             _to_dtype(total, dx_ptr.dtype.element_ty, INTERPRET_BF16),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["threshold"])
def _lora_grad_a_kernel(du_ptr, x_ptr, da_ptr, seed_ptr, offsets_ptr, M, K, R, threshold, keep_scale,
                        DROPOUT: tl.constexpr, INTERPRET_BF16: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    r0, rank, seed_mix = _adapter(seed_ptr, offsets_ptr, tl.program_id(1))
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        du_t = tl.load(du_ptr + offs_m[None, :] * R + (r0 + offs_r)[:, None],
                       mask=(offs_m[None, :] < M) & (offs_r[:, None] < rank), other=0.0)
        x = _dropped_x_tile(x_ptr, offs_m, offs_k, M, K, seed_mix, threshold.to(tl.uint32), keep_scale,
                            da_ptr.dtype.element_ty, DROPOUT, INTERPRET_BF16)
        acc = _dot(du_t, x, acc, INTERPRET_BF16)
    tl.store(da_ptr + (r0 + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :],
             _to_dtype(acc, da_ptr.dtype.element_ty, INTERPRET_BF16),
             mask=(offs_r[:, None] < rank) & (offs_k[None, :] < K))


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)
_BLOCK_M = _BLOCK_K = 64


class AdapterGroup:
    """A group of adapters reading one x, as the kernels take it: rank offsets and mixed seeds (device tensors),
    the dropout threshold and keep scale, and the rank tile (largest rank rounded up to a power of two, >= 16)."""

    def __init__(self, ranks: list[int], p: float, seeds: list[int], device: torch.device):
        from fastft.reference.lora import dropout_threshold, mix32

        offsets = [0]
        for rank in ranks:
            offsets.append(offsets[-1] + rank)
        self.offsets = torch.tensor(offsets, dtype=torch.int32, device=device)
        self.seed_mixes = mix32(torch.tensor([s & 0xFFFFFFFF for s in seeds], dtype=torch.int64)).to(device)
        self.threshold, self.keep_scale, self.dropout = dropout_threshold(p), 1.0 / (1.0 - p), p > 0
        self.block_r = max(16, triton.next_power_of_2(max(ranks)))
        self.size = len(ranks)

    def launch(self, kernel, grid, tensors, sizes, dtype: torch.dtype) -> None:
        """kernel[grid](*tensors, seeds, offsets, *sizes, threshold, keep_scale) with the group's constants."""
        kernel[grid](*tensors, self.seed_mixes, self.offsets, *sizes, self.threshold, self.keep_scale,
                     DROPOUT=self.dropout, INTERPRET_BF16=_INTERPRET and dtype == torch.bfloat16,
                     BLOCK_M=_BLOCK_M, BLOCK_R=self.block_r, BLOCK_K=_BLOCK_K)


def _check(x: torch.Tensor, a: torch.Tensor):
    if x.dtype not in _SUPPORTED or a.dtype not in _SUPPORTED:
        raise TypeError(f"LoRA kernels take x and lora_A in {_SUPPORTED}, got {x.dtype} and {a.dtype}")


def lora_down(x: torch.Tensor, a: torch.Tensor, group: AdapterGroup) -> torch.Tensor:
    """u (M, R) in A's dtype: u[:, g] = dropout_g(x) @ A_g^T; x (M, K) and the concatenated A (R, K) contiguous."""
    _check(x, a)
    (M, K), R = x.shape, a.shape[0]
    u = torch.empty((M, R), dtype=a.dtype, device=x.device)
    group.launch(_lora_down_kernel, (triton.cdiv(M, _BLOCK_M), group.size), (x, a, u), (M, K, R), a.dtype)
    return u


def lora_grad_x(du: torch.Tensor, a: torch.Tensor, group: AdapterGroup, dtype: torch.dtype) -> torch.Tensor:
    """dx (M, K) in `dtype`: sum over the group of dropout_g(du_g @ A_g); du (M, R), A (R, K) contiguous, one dtype."""
    _check(du, a)
    M, (R, K) = du.shape[0], a.shape
    dx = torch.empty((M, K), dtype=dtype, device=du.device)
    group.launch(_lora_grad_x_kernel, (triton.cdiv(M, _BLOCK_M), triton.cdiv(K, _BLOCK_K)), (du, a, dx),
                 (M, K, R, group.size), a.dtype)
    return dx


def lora_grad_a(du: torch.Tensor, x: torch.Tensor, group: AdapterGroup) -> torch.Tensor:
    """dA (R, K) in du's dtype (A's): dA_g = du_g^T @ dropout_g(x); du (M, R), x (M, K) contiguous."""
    _check(x, du)
    (M, K), R = x.shape, du.shape[1]
    da = torch.empty((R, K), dtype=du.dtype, device=x.device)
    group.launch(_lora_grad_a_kernel, (triton.cdiv(K, _BLOCK_K), group.size), (du, x, da), (M, K, R), du.dtype)
    return da
