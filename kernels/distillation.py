"""Triton kernel of the distillation loss's soft term over rows of student and teacher logits (formulas:
fastft/reference/distillation.py): per row, the generalized JSD(beta) between softmax(zt / T) and softmax(zs / T),
and its gradient with respect to zs / T, written over zs.

Three kernels over a (rows, vocabulary slices) grid, each slice whole tiles of BLOCK_V, so that a chunk of ~100
rows still launches hundreds of programs (one program per row left most of a 132-SM GPU idle at V = 128256):
(1) per slice, an online (streaming) max and sum of exp of both rows, never holding a full row of V logits;
(2) per slice, with the row's log-sum-exps combined from (1)'s partials, the per-element terms, their sum and the
centring sum sum_j q_j g_j (for beta = 0 the gradient q - p is written here); (3) per slice, the gradient
q_j (g_j - centre) with the row's centre summed from (2)'s partials.
Bytes per row: 2 x 4V read per pass, 4V written; ~15 fp32 ops and 2-3 exp/log per element and pass: memory-bound,
96 rows x V = 128256 with the gradient: 3 passes x 2 x 49 MB + 49 MB = 345 MB, ~0.12 ms at 3 TB/s.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

FORWARD_KL, REVERSE_KL, MIXTURE = 0, 1, 2


@triton.jit
def _log_mixture(a, b):
    """log(exp(a) + exp(b)) with an accurate log1p (Goldberg: log(u) * x / (u - 1), u = 1 + x): the centred
    gradient q (g - sum q g) cancels, so g's small terms matter."""
    x = tl.exp(-tl.abs(a - b))
    u = 1.0 + x
    log1p = tl.where(u == 1.0, x, tl.log(u) * x / tl.where(u == 1.0, 1.0, u - 1.0))  # no 0/0 in either branch
    return tl.maximum(a, b) + log1p


@triton.jit
def _log_probs(zs_row, zt_row, offs, mask, inv_t, lse_s, lse_t):
    zs = tl.load(zs_row + offs, mask=mask, other=0.0)
    zt = tl.load(zt_row + offs, mask=mask, other=0.0)
    return zs * inv_t - lse_s, zt * inv_t - lse_t


@triton.jit
def _slice_partials_kernel(zs_ptr, zt_ptr, part_ptr, V, stride_s, stride_t, inv_t, n_slices, SLICE: tl.constexpr,
                           BLOCK_V: tl.constexpr):
    """Pass 1 on vocabulary slice `slice` of row `row`: an online (streaming) max and sum of exp of both rows' scaled
    logits, per lane, folded to one (max, sum) per row: part[row, slice] = (max_s, sum_s, max_t, sum_t)."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * SLICE
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    lanes = tl.arange(0, BLOCK_V)
    max_s = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    max_t = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    sum_s = tl.zeros((BLOCK_V,), tl.float32)
    sum_t = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(start, start + SLICE, BLOCK_V):
        offs = v0 + lanes
        mask = offs < V
        xs = tl.where(mask, tl.load(zs_row + offs, mask=mask, other=0.0) * inv_t, float("-inf"))
        xt = tl.where(mask, tl.load(zt_row + offs, mask=mask, other=0.0) * inv_t, float("-inf"))
        new_s = tl.maximum(max_s, xs)
        new_t = tl.maximum(max_t, xt)
        sum_s = sum_s * tl.exp(tl.where(new_s == float("-inf"), 0.0, max_s - new_s)) + tl.where(
            mask, tl.exp(xs - new_s), 0.0)
        sum_t = sum_t * tl.exp(tl.where(new_t == float("-inf"), 0.0, max_t - new_t)) + tl.where(
            mask, tl.exp(xt - new_t), 0.0)
        max_s, max_t = new_s, new_t
    slice_max_s = tl.max(max_s, axis=0)
    slice_max_t = tl.max(max_t, axis=0)
    slice_sum_s = tl.sum(tl.where(max_s == float("-inf"), 0.0, sum_s * tl.exp(max_s - slice_max_s)), axis=0)
    slice_sum_t = tl.sum(tl.where(max_t == float("-inf"), 0.0, sum_t * tl.exp(max_t - slice_max_t)), axis=0)
    out = part_ptr + (row * n_slices + tl.program_id(1)) * 4
    tl.store(out, slice_max_s)
    tl.store(out + 1, slice_sum_s)
    tl.store(out + 2, slice_max_t)
    tl.store(out + 3, slice_sum_t)


@triton.jit
def _row_lse(part_ptr, row, n_slices, BLOCK_S: tl.constexpr):
    """log-sum-exp of a row's scaled student and teacher logits from its slices' (max, sum) partials."""
    slices = tl.arange(0, BLOCK_S)
    ok = slices < n_slices
    base = part_ptr + (row * n_slices + slices) * 4
    max_s = tl.load(base, mask=ok, other=float("-inf"))
    sum_s = tl.load(base + 1, mask=ok, other=0.0)
    max_t = tl.load(base + 2, mask=ok, other=float("-inf"))
    sum_t = tl.load(base + 3, mask=ok, other=0.0)
    row_max_s = tl.max(max_s, axis=0)
    row_max_t = tl.max(max_t, axis=0)
    lse_s = row_max_s + tl.log(tl.sum(tl.where(max_s == float("-inf"), 0.0, sum_s * tl.exp(max_s - row_max_s)),
                                      axis=0))
    lse_t = row_max_t + tl.log(tl.sum(tl.where(max_t == float("-inf"), 0.0, sum_t * tl.exp(max_t - row_max_t)),
                                      axis=0))
    return lse_s, lse_t


@triton.jit
def _slice_terms_kernel(zs_ptr, zt_ptr, part_ptr, terms_ptr, V, stride_s, stride_t, inv_t, beta, log_b, log_1mb,
                        grad_scale, n_slices, MODE: tl.constexpr, WANT_GRAD: tl.constexpr, SLICE: tl.constexpr,
                        BLOCK_V: tl.constexpr, BLOCK_S: tl.constexpr):
    """Pass 2 on a slice: terms[row, slice] = (sum of the JSD terms, centring sum sum_j q_j g_j) over the slice; for
    beta = 0 the gradient q - p is written here."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * SLICE
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    lse_s, lse_t = _row_lse(part_ptr, row, n_slices, BLOCK_S)
    lanes = tl.arange(0, BLOCK_V)
    soft = tl.zeros((BLOCK_V,), tl.float32)
    centre = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(start, start + SLICE, BLOCK_V):
        offs = v0 + lanes
        mask = offs < V
        s, t = _log_probs(zs_row, zt_row, offs, mask, inv_t, lse_s, lse_t)
        q = tl.exp(s)
        p = tl.exp(t)
        if MODE == 0:
            soft += tl.where(mask, p * (t - s), 0.0)
            if WANT_GRAD:
                tl.store(zs_row + offs, grad_scale * (q - p), mask=mask)
        else:
            if MODE == 1:
                g = s - t
                soft += tl.where(mask, q * g, 0.0)
            else:
                log_m = _log_mixture(s + log_1mb, t + log_b)
                soft += tl.where(mask, beta * p * (t - log_m) + (1.0 - beta) * q * (s - log_m), 0.0)
                g = (1.0 - beta) * (s - log_m)
            centre += tl.where(mask, q * g, 0.0)
    out = terms_ptr + (row * n_slices + tl.program_id(1)) * 2
    tl.store(out, tl.sum(soft, axis=0))
    tl.store(out + 1, tl.sum(centre, axis=0))


@triton.jit
def _slice_grad_kernel(zs_ptr, zt_ptr, part_ptr, terms_ptr, V, stride_s, stride_t, inv_t, beta, log_b, log_1mb,
                       grad_scale, n_slices, MODE: tl.constexpr, SLICE: tl.constexpr, BLOCK_V: tl.constexpr,
                       BLOCK_S: tl.constexpr):
    """Pass 3 on a slice (beta > 0): the gradient q_j (g_j - centre), written over zs."""
    row = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * SLICE
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    lse_s, lse_t = _row_lse(part_ptr, row, n_slices, BLOCK_S)
    slices = tl.arange(0, BLOCK_S)
    row_centre = tl.sum(tl.load(terms_ptr + (row * n_slices + slices) * 2 + 1, mask=slices < n_slices, other=0.0),
                        axis=0)
    lanes = tl.arange(0, BLOCK_V)
    for v0 in range(start, start + SLICE, BLOCK_V):
        offs = v0 + lanes
        mask = offs < V
        s, t = _log_probs(zs_row, zt_row, offs, mask, inv_t, lse_s, lse_t)
        if MODE == 1:
            g = s - t
        else:
            g = (1.0 - beta) * (s - _log_mixture(s + log_1mb, t + log_b))
        tl.store(zs_row + offs, grad_scale * tl.exp(s) * (g - row_centre), mask=mask)


_BLOCK_V = 1024
# Programs to aim for: 4 per SM of a 132-SM H100, so that a chunk of ~100 rows (48 MiB of fp32 logits at V = 128256)
# still fills the GPU: each row is split into vocabulary slices of whole BLOCK_V tiles.
_TARGET_PROGRAMS = 528


def slices_per_row(rows: int, V: int) -> tuple[int, int]:
    """(slices, slice length): enough slices for ~_TARGET_PROGRAMS programs, each a whole number of BLOCK_V tiles."""
    tiles = triton.cdiv(V, _BLOCK_V)
    wanted = max(1, min(tiles, triton.cdiv(_TARGET_PROGRAMS, max(rows, 1)), 256))
    tiles_per_slice = triton.cdiv(tiles, wanted)
    return triton.cdiv(tiles, tiles_per_slice), tiles_per_slice * _BLOCK_V


def distill_soft_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, beta: float,
                      grad_scale: float, want_grad: bool = True) -> torch.Tensor:
    """Per-row generalized JSD(beta) (fp32, (rows,)) of fp32 (rows, V) logits with unit column stride; with
    want_grad, student_logits is overwritten by grad_scale * d(JSD)/d(student_logits / T).

    Grid: (rows, slices) programs per pass, the slices whole BLOCK_V tiles of the vocabulary (`slices_per_row`): at
    V = 128256 and 96 rows, 6 slices of 21 tiles, 576 programs. Extra memory: 24 bytes per (row, slice)."""
    if student_logits.dtype != torch.float32 or teacher_logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32, got {student_logits.dtype} and {teacher_logits.dtype}")
    rows, V = student_logits.shape
    soft = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    if not rows:
        return soft
    mode = FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else MIXTURE
    log_b = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_1mb = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    n_slices, slice_len = slices_per_row(rows, V)
    block_s = max(2, triton.next_power_of_2(n_slices))
    partials = torch.empty((rows, n_slices, 4), dtype=torch.float32, device=student_logits.device)
    terms = torch.empty((rows, n_slices, 2), dtype=torch.float32, device=student_logits.device)
    grid = (rows, n_slices)
    common = (V, student_logits.stride(0), teacher_logits.stride(0), 1.0 / temperature)
    _slice_partials_kernel[grid](student_logits, teacher_logits, partials, *common, n_slices, SLICE=slice_len,
                                 BLOCK_V=_BLOCK_V)
    scalars = (float(beta), log_b, log_1mb, float(grad_scale), n_slices)
    _slice_terms_kernel[grid](student_logits, teacher_logits, partials, terms, *common, *scalars, MODE=mode,
                              WANT_GRAD=want_grad, SLICE=slice_len, BLOCK_V=_BLOCK_V, BLOCK_S=block_s)
    if want_grad and mode != FORWARD_KL:
        _slice_grad_kernel[grid](student_logits, teacher_logits, partials, terms, *common, *scalars, MODE=mode,
                                 SLICE=slice_len, BLOCK_V=_BLOCK_V, BLOCK_S=block_s)
    torch.sum(terms[:, :, 0], dim=1, out=soft)
    return soft
