"""Triton kernel of the per-row step of the fused linear log-probabilities (formulas: fastft/reference/logprobs.py):
per row of a fp32 logits tile, the log-probability of its label and (optionally) its entropy, and, for the backward,
the gradient with respect to the logits written over the row.

One program per row (a chunk holds ~256 rows at V = 32000, ~64 at V = 128256). Pass 1 streams the row in BLOCK_V
tiles with an online log-sum-exp per lane: running max m, s = sum e^(z - m), t = sum e^(z - m) (z - m) (both
rescaled when m grows), folded across lanes at the end; entropy = log s - t / s. Pass 2 (gradient only) streams the
row again and writes dz = -p (g + e (log p + entropy)), then adds g at the label.
Bytes per row: 4V read (pass 1), 4V read + 4V written (pass 2); ~10 fp32 ops and 2 exp per element in pass 1:
memory-bound, 256 rows x V = 32000 with the gradient: 3 x 33 MB = 98 MB, ~0.03 ms at 3 TB/s.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logprob_rows_kernel(z_ptr, labels_ptr, logprob_ptr, entropy_ptr, top_ptr, grad_lp_ptr, grad_ent_ptr, V, stride,
                         WANT_ENTROPY: tl.constexpr, WANT_GRAD: tl.constexpr, GRAD_ENTROPY: tl.constexpr,
                         BLOCK_V: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride
    lanes = tl.arange(0, BLOCK_V)
    m = tl.full((BLOCK_V,), -3.0e38, tl.float32)
    s = tl.zeros((BLOCK_V,), tl.float32)
    t = tl.zeros((BLOCK_V,), tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + lanes
        mask = offs < V
        x = tl.load(z_row + offs, mask=mask, other=-3.0e38)
        top = tl.maximum(m, x)
        d = m - top
        c = tl.exp(d)
        xm = x - top
        e = tl.where(mask, tl.exp(xm), 0.0)
        if WANT_ENTROPY or GRAD_ENTROPY:
            t = c * (t + s * d) + e * xm
        s = s * c + e
        m = top
    row_max = tl.max(m, axis=0)
    c = tl.where(s > 0, tl.exp(m - row_max), 0.0)
    total = tl.sum(s * c, axis=0)
    log_s = tl.log(total)
    lse = row_max + log_s
    label = tl.load(labels_ptr + row)
    tl.store(logprob_ptr + row, tl.load(z_row + label) - lse)
    tl.store(top_ptr + row, row_max - lse)  # rounded as logprob is: equal when the label is the argmax
    h = 0.0
    if WANT_ENTROPY or GRAD_ENTROPY:
        h = log_s - tl.sum(c * (t + s * (m - row_max)), axis=0) / total
        if WANT_ENTROPY:
            tl.store(entropy_ptr + row, h)
    if WANT_GRAD:
        g = tl.load(grad_lp_ptr + row)
        e_row = 0.0
        if GRAD_ENTROPY:
            e_row = tl.load(grad_ent_ptr + row)
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + lanes
            mask = offs < V
            lp = tl.load(z_row + offs, mask=mask, other=0.0) - lse
            dz = -tl.exp(lp) * (g + e_row * (lp + h)) + tl.where(offs == label, g, 0.0)
            tl.store(z_row + offs, dz, mask=mask)


_BLOCK_V = 1024


def logprob_rows(z: torch.Tensor, labels: torch.Tensor, want_entropy: bool, grad_logprob=None, grad_entropy=None):
    """(logprob (rows,), entropy (rows,) or None, top (rows,): each row's largest log-probability), fp32, of a fp32 logits tile z (rows, V) with unit column stride
    and int64 labels in [0, V); with grad_logprob (rows,) (and grad_entropy (rows,) or None), z is overwritten by
    the gradient with respect to the logits. Grid: one program per row. Extra memory: the outputs only."""
    if z.dtype != torch.float32:
        raise TypeError(f"z must be float32, got {z.dtype}")
    rows, V = z.shape
    logprob = torch.empty(rows, dtype=torch.float32, device=z.device)
    entropy = torch.empty(rows if want_entropy else 1, dtype=torch.float32, device=z.device)
    top = torch.empty(rows, dtype=torch.float32, device=z.device)
    if rows:
        want_grad = grad_logprob is not None
        grad_lp = grad_logprob.to(torch.float32).contiguous() if want_grad else logprob
        grad_ent = grad_entropy.to(torch.float32).contiguous() if grad_entropy is not None else logprob
        _logprob_rows_kernel[(rows,)](z, labels.contiguous(), logprob, entropy, top, grad_lp, grad_ent, V, z.stride(0),
                                      WANT_ENTROPY=want_entropy, WANT_GRAD=want_grad,
                                      GRAD_ENTROPY=grad_entropy is not None, BLOCK_V=_BLOCK_V)
    return logprob, (entropy if want_entropy else None), top
