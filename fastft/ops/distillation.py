"""torch.library ops of the fused linear distillation loss (formulas: fastft/reference/distillation.py).

The [tokens, vocab] logits never exist whole: tokens are processed in chunks whose fp32 logits tile is about
_TILE_BYTES; per chunk the student and teacher logits are computed (fp32 accumulation, vocab tiles when the head
is not fp32), then the per-token loss and its gradient with respect to the student logits, which go straight
into grad_hidden (dz @ W) and, only when the head is trainable, grad_weight (dz^T @ h, fp32 accumulator).
The student and teacher tiles are allocated once per call and reused by every chunk. Peak extra memory: those
two tiles, the temporaries of the per-row computation (on the fused CPU and GPU kernels one more tile only with a
hard-label term, alpha < 1; about six smaller tiles on the torch path) and the fp32 grad_weight accumulator,
independent of the number of tokens.
On CPU with fp32 tiles, the per-row soft term and its gradient run in one C++ kernel (csrc/distillation.cpp:
four passes over a cached row, AVX2 exp/log) instead of ~20 torch ops; on CUDA in one Triton kernel
(kernels/distillation.py: an online log-sum-exp over vocabulary tiles, never a whole row in registers); other
cases (teacher top-k, fp64) use torch ops.

- teacher_topk > 0: the soft term over the teacher's top-k tokens + a rest bucket; 0: the full vocabulary.
- fastft::fused_linear_distillation(...) -> (loss, grad_hidden, grad_weight, grad_bias): with a scalar reduction
  (per_token=False) the gradients are computed in the forward pass (scaled by the incoming gradient in
  backward); with per_token=True only the per-token losses, and backward reruns the chunks with per-token weights
  (fastft::fused_linear_distillation_backward). Gradients not asked for are empty tensors.
- The forward op checks the values of labels (each in [0, vocab) or ignore_index) and of denominator (> 0 and
  finite: a num_items_in_batch of 0, negative, nan or inf is an error, not a loss) with one device-to-host copy
  (check_values); inside torch.compile'd graphs too, as the op's implementation runs with the real tensors there.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft.ops.routing import dispatch


# Chunks of ~390 tokens at V = 32000. Each chunk's GEMMs stream (and on CPU re-pack) the whole head, so fewer,
# taller chunks run them faster: on a 2-core AVX-512 CPU, MKL's (tokens x 1024) @ (1024 x 32000) ran at 31-41
# GFLOP/s with 65 rows, 56-76 with 256 and 63-79 with 512 (74-97 with all 2048 rows), and the whole loss (2048
# tokens, trainable head) took 4.2 / 4.1 / 3.9 s with 32 / 48 / 64 MiB tiles. Two fp32 tiles (student and teacher
# logits, reused by every chunk) plus the fp32 grad_weight accumulator are the extra memory.
_TILE_BYTES = 48 << 20
# The torch path (teacher top-k, fp64) holds about six tiles of temporaries per chunk: smaller chunks.
_TORCH_PATH_TILE_BYTES = 8 << 20
_VOCAB_TILE = 8192


def chunk_rows(vocab: int, tile_bytes: int, element_bytes: int = 4) -> int:
    """Tokens per chunk so that one (tokens, vocab) tile of elements of element_bytes is about tile_bytes."""
    return max(8, min(4096, tile_bytes // (element_bytes * max(vocab, 1))))


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype, out: Tensor) -> Tensor:
    """hidden @ weight^T + bias in `dtype`, written into `out` (rows, vocab), which every chunk reuses (a fresh
    tile per chunk would be page-faulted in again each time); a lower-precision head is upcast one vocab tile at
    a time."""
    if hidden.dtype == weight.dtype == dtype:
        if bias is None:
            return torch.mm(hidden, weight.t(), out=out)
        return torch.addmm(bias.to(dtype), hidden, weight.t(), out=out)
    wide = hidden.to(dtype)
    for v0 in range(0, weight.shape[0], _VOCAB_TILE):
        v1 = min(v0 + _VOCAB_TILE, weight.shape[0])
        tile_bias = None if bias is None else bias[v0:v1].to(dtype)
        out[:, v0:v1] = F.linear(wide, weight[v0:v1].to(dtype), tile_bias)
    return out


def _times_weight(dz: Tensor, weight: Tensor) -> Tensor:
    """dz @ weight, upcasting a lower-precision weight one vocab tile at a time."""
    if weight.dtype == dz.dtype:
        return dz @ weight
    out = torch.zeros(dz.shape[0], weight.shape[1], dtype=dz.dtype, device=dz.device)
    for v0 in range(0, weight.shape[0], _VOCAB_TILE):
        v1 = min(v0 + _VOCAB_TILE, weight.shape[0])
        out.addmm_(dz[:, v0:v1], weight[v0:v1].to(dz.dtype))
    return out


def _rows(zs, zt, labels, beta, temperature, alpha, scale_by_t2, ignore_index, want_grad, topk):
    """Per-row loss and (want_grad) its gradient with respect to the student logits zs (zs, zt: scratch)."""
    factor = alpha * (temperature**2 if scale_by_t2 else 1.0)
    with_ce = labels is not None and alpha != 1.0
    ce_log_probs = F.log_softmax(zs, dim=-1) if with_ce else None  # before zs becomes scratch
    # zs and zt are this chunk's scratch logits: the fused row kernels overwrite them
    soft, grad = dispatch("distill_soft_rows", zs.device.type, zs, zt, beta, temperature, want_grad, topk,
                          factor / temperature)
    loss = factor * soft
    if labels is not None:
        valid = labels != ignore_index
        if with_ce:
            safe = torch.where(valid, labels, torch.zeros_like(labels))
            loss = loss - (1 - alpha) * ce_log_probs.gather(1, safe.unsqueeze(1)).squeeze(1)
            if grad is not None:
                grad.add_(ce_log_probs.exp_(), alpha=1 - alpha)
                grad.scatter_add_(1, safe.unsqueeze(1), torch.full_like(loss, alpha - 1).unsqueeze(1))
        loss = torch.where(valid, loss, torch.zeros_like(loss))
        if grad is not None:
            grad.mul_(valid.unsqueeze(1))
    return loss, grad


def _run(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, beta,
         temperature, alpha, scale_by_t2, ignore_index, teacher_topk, row_weights, want_hidden, want_weight,
         want_bias):
    """Chunked pass: per-token losses and, for row_weights (None: no gradients), the weighted gradients."""
    dtype = _compute_dtype(student_hidden, student_weight)
    n, vocab = student_hidden.shape[0], student_weight.shape[0]
    losses = torch.empty(n, dtype=dtype, device=student_hidden.device)
    want_grad = row_weights is not None
    grad_hidden = torch.empty_like(student_hidden) if want_grad and want_hidden else None
    grad_weight = torch.zeros(student_weight.shape, dtype=dtype, device=student_weight.device) \
        if want_grad and want_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=student_weight.device) if want_grad and want_bias else None
    # the fused row kernels keep no temporaries; the torch path (top-k, fp64) about six tiles
    tile_bytes = _TILE_BYTES if dtype == torch.float32 and not teacher_topk else _TORCH_PATH_TILE_BYTES
    step = max(1, min(n, chunk_rows(vocab, tile_bytes, torch.finfo(dtype).bits // 8)))
    student_tile = torch.empty(step, vocab, dtype=dtype, device=student_hidden.device)
    teacher_tile = torch.empty_like(student_tile)
    for r0 in range(0, n, step):
        r1 = min(r0 + step, n)
        hidden = student_hidden[r0:r1]
        zs = _logits(hidden, student_weight, student_bias, dtype, student_tile[:r1 - r0])
        zt = _logits(teacher_hidden[r0:r1], teacher_weight, teacher_bias, dtype, teacher_tile[:r1 - r0])
        chunk_labels = None if labels is None else labels[r0:r1]
        loss, dz = _rows(zs, zt, chunk_labels, beta, temperature, alpha, scale_by_t2, ignore_index, want_grad,
                         teacher_topk)
        losses[r0:r1] = loss
        if not want_grad:
            continue
        dz.mul_(row_weights[r0:r1].unsqueeze(1).to(dtype) if row_weights.dim() else row_weights.to(dtype))
        if grad_hidden is not None:
            grad_hidden[r0:r1] = _times_weight(dz, student_weight)
        if grad_weight is not None:
            grad_weight.addmm_(dz.t(), hidden.to(dtype))
        if grad_bias is not None:
            grad_bias.add_(dz.sum(0))
    def empty():  # a distinct tensor each: op outputs may not alias one another
        return student_hidden.new_empty(0)

    return (losses, empty() if grad_hidden is None else grad_hidden,
            empty() if grad_weight is None else grad_weight.to(student_weight.dtype),
            empty() if grad_bias is None else grad_bias.to(student_bias.dtype))


def check_values(labels: Optional[Tensor], vocab: int, ignore_index: int, denominator: Tensor) -> None:
    """ValueError naming labels (the first value outside [0, vocab) other than ignore_index, its flat index and
    the vocabulary size) or num_items_in_batch (a mean's denominator that is not > 0 and finite), after one
    device-to-host copy of two flags on CPU; on an accelerator the same condition is a device-side assert, which
    needs no host sync (and runs inside CUDA graphs)."""
    flags = [~(torch.isfinite(denominator) & (denominator > 0)).reshape(())]
    outside = None
    if labels is not None:
        outside = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
        flags.append(outside.any())
    if denominator.device.type != "cpu":  # no host sync per step on an accelerator: an asynchronous device assert
        torch._assert_async(~torch.stack(flags).any(), f"labels must be in [0, {vocab}) or equal ignore_index="
                            f"{ignore_index}, and num_items_in_batch a finite number > 0")
        return
    bad_denominator, *bad_labels = torch.stack(flags).tolist()
    if bad_labels and bad_labels[0]:
        index = int(outside.reshape(-1).nonzero()[0])
        value = int(labels.reshape(-1)[index])
        raise ValueError(f"labels must be in [0, {vocab}) (the vocabulary size) or equal ignore_index={ignore_index}, "
                         f"got {value} at flat index {index}")
    if bad_denominator:
        raise ValueError(f"num_items_in_batch must be a finite number > 0 (the mean's denominator), got "
                         f"{denominator.item():g}")


@torch.library.custom_op("fastft::fused_linear_distillation", mutates_args=())
def fused_linear_distillation(
    student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor, teacher_weight: Tensor,
    labels: Optional[Tensor], student_bias: Optional[Tensor], teacher_bias: Optional[Tensor], beta: float,
    temperature: float, alpha: float, scale_by_t2: bool, ignore_index: int, teacher_topk: int, denominator: Tensor,
    per_token: bool, want_hidden: bool, want_weight: bool, want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_values(labels, student_weight.shape[0], ignore_index, denominator)
    row_weights = None if per_token else 1.0 / denominator.to(torch.float64)
    losses, grad_hidden, grad_weight, grad_bias = _run(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, beta,
        temperature, alpha, scale_by_t2, ignore_index, teacher_topk, row_weights, want_hidden, want_weight,
        want_bias)
    loss = losses if per_token else (losses.sum() / denominator).to(losses.dtype)  # fp32 (fp64 for fp64 inputs)
    return loss, grad_hidden, grad_weight, grad_bias


@fused_linear_distillation.register_fake
def _(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, beta,
      temperature, alpha, scale_by_t2, ignore_index, teacher_topk, denominator, per_token, want_hidden, want_weight,
      want_bias):
    gradients = not per_token
    n = student_hidden.shape[0]
    loss_dtype = _compute_dtype(student_hidden, student_weight)
    return (student_hidden.new_empty(n if per_token else (), dtype=loss_dtype),
            student_hidden.new_empty(student_hidden.shape if gradients and want_hidden else 0),
            student_weight.new_empty(student_weight.shape if gradients and want_weight else 0),
            student_hidden.new_empty(student_bias.shape if gradients and want_bias else 0))


@torch.library.custom_op("fastft::fused_linear_distillation_backward", mutates_args=())
def fused_linear_distillation_backward(
    grad_losses: Tensor, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
    teacher_weight: Tensor, labels: Optional[Tensor], student_bias: Optional[Tensor],
    teacher_bias: Optional[Tensor], beta: float, temperature: float, alpha: float, scale_by_t2: bool,
    ignore_index: int, teacher_topk: int, want_hidden: bool, want_weight: bool, want_bias: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    _, grad_hidden, grad_weight, grad_bias = _run(
        student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, beta,
        temperature, alpha, scale_by_t2, ignore_index, teacher_topk, grad_losses, want_hidden, want_weight,
        want_bias)
    return grad_hidden, grad_weight, grad_bias


@fused_linear_distillation_backward.register_fake
def _(grad_losses, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias,
      beta, temperature, alpha, scale_by_t2, ignore_index, teacher_topk, want_hidden, want_weight, want_bias):
    return (student_hidden.new_empty(student_hidden.shape if want_hidden else 0),
            student_weight.new_empty(student_weight.shape if want_weight else 0),
            student_hidden.new_empty(student_bias.shape if want_bias else 0))


def _setup_context(ctx, inputs, output):
    (student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias, teacher_bias, beta,
     temperature, alpha, scale_by_t2, ignore_index, teacher_topk, denominator, per_token, *_) = inputs
    ctx.per_token = per_token
    if per_token:  # backward recomputes the chunks with per-token weights
        ctx.save_for_backward(student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias,
                              teacher_bias)
        ctx.options = (beta, temperature, alpha, scale_by_t2, ignore_index, teacher_topk)
    else:  # the gradients are outputs already
        ctx.save_for_backward(*output[1:])
    ctx.has_bias = student_bias is not None
    # Only the loss output gets a gradient; the others would be handed to backward as materialized zeros, one more
    # V x H buffer for a trainable head.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_loss, *_):
    if grad_loss is None:  # the loss output is not part of what is being differentiated
        return (None,) * 18
    wants = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[5]
    if ctx.per_token:
        inputs = ctx.saved_tensors
        grads = fused_linear_distillation_backward(grad_loss, *inputs, *ctx.options, *wants)
    else:
        # A loss's incoming gradient is usually exactly 1: then the precomputed gradients are handed over as they
        # are, without a second V x H buffer (eager tensors only: tracing cannot branch on a value).
        unit = type(grad_loss) is torch.Tensor and bool(grad_loss == 1)
        grads = tuple(g if unit or not g.numel() else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    grad_hidden, grad_weight, grad_bias = (g if want else None for g, want in zip(grads, wants))
    return (grad_hidden, grad_weight, None, None, None, grad_bias) + (None,) * 12


fused_linear_distillation.register_autograd(_backward, setup_context=_setup_context)
