"""Triton kernel of the distillation loss's soft term over rows of student and teacher logits (formulas:
fastft/reference/distillation.py): per row, the generalized JSD(beta) between softmax(zt / T) and softmax(zs / T),
and its gradient with respect to zs / T, written over zs.

One program per row, three passes over vocabulary tiles of BLOCK_V: (1) an online (streaming) log-sum-exp of both
rows, never holding a full row of V logits; (2) the per-element terms, their sum and the centring sum
sum_j q_j g_j; (3) the gradient q_j (g_j - centre) (for beta = 0 the gradient q - p is written in pass 2).
Bytes per row: 2 x 4V read per pass, 4V written; ~15 fp32 ops and 2-3 exp/log per element and pass.
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
def _distill_soft_rows_kernel(zs_ptr, zt_ptr, soft_ptr, V, stride_s, stride_t, inv_t, beta, log_b, log_1mb,
                              grad_scale, MODE: tl.constexpr, WANT_GRAD: tl.constexpr, BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * stride_s
    zt_row = zt_ptr + row * stride_t
    lanes = tl.arange(0, BLOCK_V)
    # (1) online log-sum-exp, per lane: running maxima and sums rescaled when a maximum grows
    max_s = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    max_t = tl.full((BLOCK_V,), float("-inf"), tl.float32)
    sum_s = tl.zeros((BLOCK_V,), tl.float32)
    sum_t = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
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
    row_max_s = tl.max(max_s, axis=0)
    row_max_t = tl.max(max_t, axis=0)
    lse_s = row_max_s + tl.log(tl.sum(tl.where(max_s == float("-inf"), 0.0, sum_s * tl.exp(max_s - row_max_s)),
                                      axis=0))
    lse_t = row_max_t + tl.log(tl.sum(tl.where(max_t == float("-inf"), 0.0, sum_t * tl.exp(max_t - row_max_t)),
                                      axis=0))
    # (2) terms, their sum and the centring sum
    soft = tl.zeros((BLOCK_V,), tl.float32)
    centre = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
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
    tl.store(soft_ptr + row, tl.sum(soft, axis=0))
    # (3) the gradient q (g - centre), over zs
    if WANT_GRAD and MODE != 0:
        row_centre = tl.sum(centre, axis=0)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            mask = offs < V
            s, t = _log_probs(zs_row, zt_row, offs, mask, inv_t, lse_s, lse_t)
            if MODE == 1:
                g = s - t
            else:
                g = (1.0 - beta) * (s - _log_mixture(s + log_1mb, t + log_b))
            tl.store(zs_row + offs, grad_scale * tl.exp(s) * (g - row_centre), mask=mask)


def distill_soft_rows(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float, beta: float,
                      grad_scale: float, want_grad: bool = True) -> torch.Tensor:
    """Per-row generalized JSD(beta) (fp32, (rows,)) of fp32 (rows, V) logits with unit column stride; with
    want_grad, student_logits is overwritten by grad_scale * d(JSD)/d(student_logits / T)."""
    if student_logits.dtype != torch.float32 or teacher_logits.dtype != torch.float32:
        raise TypeError(f"logits must be float32, got {student_logits.dtype} and {teacher_logits.dtype}")
    rows, V = student_logits.shape
    soft = torch.empty(rows, dtype=torch.float32, device=student_logits.device)
    mode = FORWARD_KL if beta == 0.0 else REVERSE_KL if beta == 1.0 else MIXTURE
    log_b = math.log(beta) if 0.0 < beta < 1.0 else 0.0
    log_1mb = math.log1p(-beta) if 0.0 < beta < 1.0 else 0.0
    if rows:
        _distill_soft_rows_kernel[(rows,)](
            student_logits, teacher_logits, soft, V, student_logits.stride(0), teacher_logits.stride(0),
            1.0 / temperature, float(beta), log_b, log_1mb, float(grad_scale), MODE=mode, WANT_GRAD=want_grad,
            BLOCK_V=1024)
    return soft
