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
fp32 copy of x exists; fp32 products run on tensor cores as TF32 (see fastft.kernels.common for the precision and
its error bound). Tiles: BLOCK_M tokens x BLOCK_K features x BLOCK_R, the group's largest rank rounded up to a power
of two (>= 16); BLOCK_M / BLOCK_K / warps / stages autotuned per (M bucket, K, BLOCK_R), see `_CONFIGS`.
lora_grad_A computes dA^T = dropout(x)^T @ du, so the MMA's M side is BLOCK_K (64 / 128 features: warpgroup MMA on
sm_90) rather than the rank (16 for r <= 16, which only mma.sync takes).

Roofline per call (M tokens, K features, R = sum of ranks, s = bytes per element of x, a of A):
- lora_down:   2 M K R FLOPs; HBM M K s (x, once per adapter of the group: R / r_max times for a group) + R K a
               + M R a. Intensity ~2 R / s FLOP/byte: memory-bound for every rank (R = 16, bf16: 16 FLOP/byte
               vs H100's ~300), so time ~ bytes / 3 TB/s: M = 4096, K = 4096, bf16, r = 16: 34 MB, ~11 us.
- lora_grad_x: 2 M K R FLOPs; HBM M R a + R K a + M K s (dx written once for the group): ~11 us at the same size.
- lora_grad_A: 2 M K R FLOPs; HBM M K s (x, once per adapter) + M R a + R K a: ~11 us.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastft.kernels.common import _INTERPRET, Tuned, _dot, _to_dtype, config, fp32_precision


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
def _lora_down_kernel(x_ptr, a_ptr, u_ptr, seed_ptr, offsets_ptr, threshold, keep_scale, M, K, R, m_bucket,
                      DROPOUT: tl.constexpr, INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
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
        acc = _dot(x, a, acc, INTERPRET_BF16, FP32_PRECISION)
    tl.store(u_ptr + offs_m[:, None] * R + (r0 + offs_r)[None, :],
             _to_dtype(acc, u_ptr.dtype.element_ty, INTERPRET_BF16),
             mask=(offs_m[:, None] < M) & (offs_r[None, :] < rank))


@triton.jit(do_not_specialize=["threshold"])
def _lora_grad_x_kernel(du_ptr, a_ptr, dx_ptr, seed_ptr, offsets_ptr, threshold, keep_scale, n_adapters, M, K, R,
                        m_bucket, DROPOUT: tl.constexpr, INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    # the rank is reduced in chunks of at most 64: a whole 256-rank fp32 (TF32x3) operand does not fit in registers
    RANK_CHUNK: tl.constexpr = BLOCK_R if BLOCK_R < 64 else 64
    total = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for g in range(0, n_adapters):
        r0, rank, seed_mix = _adapter(seed_ptr, offsets_ptr, g)
        grad = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for c in tl.static_range(0, BLOCK_R, RANK_CHUNK):
            offs_r = c + tl.arange(0, RANK_CHUNK)
            du = tl.load(du_ptr + offs_m[:, None] * R + (r0 + offs_r)[None, :],
                         mask=(offs_m[:, None] < M) & (offs_r[None, :] < rank), other=0.0)
            a = tl.load(a_ptr + (r0 + offs_r).to(tl.int64)[:, None] * K + offs_k[None, :],
                        mask=(offs_r[:, None] < rank) & (offs_k[None, :] < K), other=0.0)
            grad = _dot(du, a, grad, INTERPRET_BF16, FP32_PRECISION)
        if DROPOUT:
            keep = _dropout_keep(offs_m, offs_k, K, seed_mix) >= threshold.to(tl.uint32)
            grad = tl.where(keep, grad * keep_scale, 0.0)
        total += grad
    tl.store(dx_ptr + offs_m[:, None] * K + offs_k[None, :],
             _to_dtype(total, dx_ptr.dtype.element_ty, INTERPRET_BF16),
             mask=(offs_m[:, None] < M) & (offs_k[None, :] < K))


@triton.jit(do_not_specialize=["threshold"])
def _lora_grad_a_kernel(du_ptr, x_ptr, da_ptr, seed_ptr, offsets_ptr, threshold, keep_scale, M, K, R, m_bucket,
                        DROPOUT: tl.constexpr, INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    """dA_g^T (BLOCK_K, BLOCK_R) = dropout_g(x)^T @ du_g, accumulated over M, stored transposed into dA (R, K)."""
    r0, rank, seed_mix = _adapter(seed_ptr, offsets_ptr, tl.program_id(1))
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_r = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_K, BLOCK_R), dtype=tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M).to(tl.int64)
        du = tl.load(du_ptr + offs_m[:, None] * R + (r0 + offs_r)[None, :],
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < rank), other=0.0)
        x = _dropped_x_tile(x_ptr, offs_m, offs_k, M, K, seed_mix, threshold.to(tl.uint32), keep_scale,
                            da_ptr.dtype.element_ty, DROPOUT, INTERPRET_BF16)
        acc = _dot(tl.trans(x), du, acc, INTERPRET_BF16, FP32_PRECISION)
    tl.store(da_ptr + (r0 + offs_r).to(tl.int64)[None, :] * K + offs_k[:, None],
             _to_dtype(acc, da_ptr.dtype.element_ty, INTERPRET_BF16),
             mask=(offs_r[None, :] < rank) & (offs_k[:, None] < K))


_SUPPORTED = (torch.float32, torch.float16, torch.bfloat16)


def m_bucket(rows: int) -> int:
    return min(256, max(16, triton.next_power_of_2(rows)))


# BLOCK_M tokens x BLOCK_K features (x BLOCK_R ranks). Half-precision adapters take 4 warps (8 for 128-row tiles);
# fp32 adapters (TF32x3: each operand held twice) and ranks above 64 (a 64 x 256 fp32 accumulator is 128 registers
# a thread at 4 warps) take 8 warps; ranks above 64 also take 2 stages of 32-feature tiles (a 256 x 64 fp32 A tile
# is 64 KB a stage), 32 x 32 tiles for fp32 adapters, 64 x 32 for fp32 ranks 33-64; lora_grad_x reduces the rank
# in chunks of 64. See `_fits`.
_CONFIGS = [config(4, 3, BLOCK_M=64, BLOCK_K=64),
            config(4, 4, BLOCK_M=64, BLOCK_K=128),
            config(8, 3, BLOCK_M=128, BLOCK_K=64),
            config(8, 3, BLOCK_M=128, BLOCK_K=128),
            config(8, 3, BLOCK_M=64, BLOCK_K=64),
            config(8, 2, BLOCK_M=64, BLOCK_K=32),
            config(8, 2, BLOCK_M=32, BLOCK_K=32),
            config(8, 3, BLOCK_M=64, BLOCK_K=32)]


def _adapter_dtype(arguments) -> torch.dtype:
    return (arguments["a_ptr"] if "a_ptr" in arguments else arguments["da_ptr"]).dtype


def _fits(c: triton.Config, BLOCK_R, **arguments) -> bool:
    """The configurations a launch may use: by rank tile and adapter dtype (see `_CONFIGS`)."""
    area = c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"]
    if BLOCK_R > 64:  # 32 x 32 tiles for fp32 adapters
        return c.num_stages == 2 and (c.kwargs["BLOCK_M"] == 32) == (_adapter_dtype(arguments) == torch.float32)
    if c.num_stages == 2:
        return False
    if _adapter_dtype(arguments) == torch.float32:  # 128 x 64 fp32 tiles need 160 KB: too close to sm_80's 163
        # ranks 33-64: 32 features a tile (64 x 64 spills on sm_80)
        return c.num_warps == 8 and area <= 64 * 64 and (BLOCK_R <= 32 or c.kwargs["BLOCK_K"] == 32)
    return (c.num_warps == 4 or c.kwargs["BLOCK_M"] == 128) and (BLOCK_R <= 32 or area <= 64 * 128)


def _heuristic(BLOCK_R, **arguments) -> triton.Config:
    if BLOCK_R > 64:
        return _CONFIGS[6] if _adapter_dtype(arguments) == torch.float32 else _CONFIGS[5]
    if _adapter_dtype(arguments) == torch.float32:
        return _CONFIGS[4] if BLOCK_R <= 32 else _CONFIGS[7]
    return _CONFIGS[0]


_KEY = ["m_bucket", "K", "R", "BLOCK_R"]
TUNED_DOWN = Tuned(_lora_down_kernel, _CONFIGS, _KEY, _heuristic, _fits)
TUNED_GRAD_X = Tuned(_lora_grad_x_kernel, _CONFIGS, _KEY, _heuristic, _fits)
TUNED_GRAD_A = Tuned(_lora_grad_a_kernel, _CONFIGS, _KEY, _heuristic, _fits)


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

    def launch(self, tuned: Tuned, grid, tensors, extra, M, K, R, dtype: torch.dtype, device) -> None:
        """The kernel with the group's constants: (*tensors, seeds, offsets, threshold, keep_scale, *extra, M, K, R,
        m_bucket)."""
        sizes = dict(M=M, K=K, R=R, m_bucket=m_bucket(M))
        tuned.launch(grid, (*tensors, self.seed_mixes, self.offsets, self.threshold, self.keep_scale, *extra),
                     sizes, device, DROPOUT=self.dropout,
                     INTERPRET_BF16=_INTERPRET and dtype == torch.bfloat16, FP32_PRECISION=fp32_precision(),
                     BLOCK_R=self.block_r)


def _check(x: torch.Tensor, a: torch.Tensor):
    if x.dtype not in _SUPPORTED or a.dtype not in _SUPPORTED:
        raise TypeError(f"LoRA kernels take x and lora_A in {_SUPPORTED}, got {x.dtype} and {a.dtype}")


def lora_down(x: torch.Tensor, a: torch.Tensor, group: AdapterGroup) -> torch.Tensor:
    """u (M, R) in A's dtype: u[:, g] = dropout_g(x) @ A_g^T; x (M, K) and the concatenated A (R, K) contiguous."""
    _check(x, a)
    (M, K), R = x.shape, a.shape[0]
    u = torch.empty((M, R), dtype=a.dtype, device=x.device)
    group.launch(TUNED_DOWN, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), group.size), (x, a, u), (), M, K, R,
                 a.dtype, x.device)
    return u


def lora_grad_x(du: torch.Tensor, a: torch.Tensor, group: AdapterGroup, dtype: torch.dtype) -> torch.Tensor:
    """dx (M, K) in `dtype`: sum over the group of dropout_g(du_g @ A_g); du (M, R), A (R, K) contiguous, one dtype."""
    _check(du, a)
    M, (R, K) = du.shape[0], a.shape
    dx = torch.empty((M, K), dtype=dtype, device=du.device)
    group.launch(TUNED_GRAD_X, lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(K, meta["BLOCK_K"])),
                 (du, a, dx), (group.size,), M, K, R, a.dtype, du.device)
    return dx


def lora_grad_a(du: torch.Tensor, x: torch.Tensor, group: AdapterGroup) -> torch.Tensor:
    """dA (R, K) in du's dtype (A's): dA_g = du_g^T @ dropout_g(x); du (M, R), x (M, K) contiguous."""
    _check(x, du)
    (M, K), R = x.shape, du.shape[1]
    da = torch.empty((R, K), dtype=du.dtype, device=x.device)
    group.launch(TUNED_GRAD_A, lambda meta: (triton.cdiv(K, meta["BLOCK_K"]), group.size), (du, x, da), (), M, K, R,
                 du.dtype, x.device)
    return da
