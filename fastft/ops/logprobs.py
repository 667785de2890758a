"""torch.library ops of the fused linear log-probabilities (formulas: fastft/reference/logprobs.py).

From hidden states (N, H), a head (V, H) (+ bias (V,)) and labels (N,): the log-probability of each label under
softmax(h W^T + b) and, when asked, each row's entropy, without the (N, V) logits. Rows labelled ignore_index are
dropped before anything else (gathered out of hidden and labels, forward and backward), so they cost no GEMM; they
come back as logprob 0, entropy 0 and a zero gradient row. The valid rows go through the head in chunks whose fp32
logits tile is about _TILE_BYTES (one tile allocated per call and reused); per chunk a row kernel (routing entry
"logprob_rows": C++ on CPU, Triton on CUDA) takes an online log-sum-exp over the vocabulary and, in backward, writes
d(logits) over the tile, which goes straight into grad_hidden (dz @ W) and, only when asked, grad_weight (dz^T h,
fp32 accumulator) and grad_bias. A bf16/fp16 head is upcast one vocabulary tile at a time.

- fastft::fused_linear_logprobs(hidden, weight, bias, labels, ignore_index, want_entropy, hidden_grad_in_forward)
  -> (logprob (N,), entropy (N,) or (0,), top (N,): each row's largest log-probability, not differentiable; logprob
  >= top says the label is a most likely token; dlogprob_dhidden (N, H) or (0,)), fp32 (fp64 for fp64 inputs).
  Saved for backward: the inputs; backward (fastft::fused_linear_logprobs_backward) recomputes each chunk's
  logits. With hidden_grad_in_forward (for a frozen head: the caller sets it when only hidden will need a
  gradient), the forward also takes each row's d logprob / d hidden = W[label] - softmax(z) @ W over the same
  chunk's logits (one GEMM more in forward), and a backward whose loss reaches the log-probabilities only is the
  chain rule row by row, grad_logprob[:, None] * dlogprob_dhidden: 2 head GEMMs in all instead of 3, for any loss
  on the log-probabilities (DPO's, KTO's, GRPO's: the gradient of one row's log-probability depends on that row
  only). A gradient through the entropy recomputes as without it. Under torch.no_grad, or when no input requires
  grad (a reference or old-policy pass), nothing is saved.
- fastft::fused_linear_nll(hidden, weight, bias, labels, ignore_index, denominator, want_*) -> (loss, grad_hidden,
  grad_weight, grad_bias): the same chunks reduced to sum(-logprob) / denominator (the causal-LM cross-entropy),
  with the gradients computed in the forward pass (one logits GEMM per chunk instead of two) and scaled by the
  incoming gradient in backward. Gradients not asked for are empty tensors.
Peak extra memory: one (chunk, V) fp32 tile, the gathered valid rows (when some rows are ignored), the fp32
grad_weight accumulator when the head is trainable.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastft.ops.distillation import _compute_dtype, _logits, _times_weight, check_values, chunk_rows
from fastft.ops.routing import dispatch

# Chunks of 256 rows at V = 32000 (see fastft/ops/distillation.py for the chunk-size measurements). A recomputing
# backward that accumulates the head's gradient takes 4x taller chunks: each chunk's d W += dz^T h reads and writes
# the whole (V, H) fp32 accumulator for a reduction only a chunk deep; DPO's loss on 4 x 1024 tokens (H = 2048,
# V = 32000, fp32) took 19.0 s instead of 22.5 s with them, for 112 MiB more at peak (fastft/bench/preference.py).
_TILE_BYTES = 32 << 20
_WEIGHT_GRAD_TILE_BYTES = 128 << 20


def _empty(like: Tensor) -> Tensor:  # a distinct tensor each: op outputs may not alias one another
    return like.new_empty(0)


def _valid_rows(hidden: Tensor, labels: Tensor, ignore_index: int):
    """(index of the rows not labelled ignore_index or None when all are, their hidden states, their labels)."""
    valid = labels != ignore_index
    if bool(valid.all()):
        return None, hidden, labels
    index = valid.nonzero().squeeze(1)
    return index, hidden.index_select(0, index), labels.index_select(0, index)


class _Pass(NamedTuple):
    logprob: Tensor
    entropy: Optional[Tensor]
    top: Tensor
    grad_hidden: Optional[Tensor]
    grad_weight: Optional[Tensor]
    grad_bias: Optional[Tensor]
    grad_logprob: Optional[Tensor]  # the d(loss)/d(logprob) the gradients were taken for (over all N rows)


def _run(hidden, weight, bias, labels, ignore_index, want_entropy, grad_logprob, grad_entropy, want_hidden,
         want_weight, want_bias, token_grad=None, hidden_grad_dtype=None, tile_bytes=None) -> _Pass:
    """Chunked pass over the valid rows: (logprob, entropy or None, top) over all N rows and, when grad_logprob (N,) is
    given (with grad_entropy (N,) or None), the gradients asked for (grad_hidden over all N rows).
    token_grad (instead of grad_logprob): an object with select(index) -> token_grad of those rows, grad(logprob,
    r0, r1) -> d(loss)/d(logprob) of valid rows r0:r1 from their log-probabilities, and grad_entropy ((N,) or None):
    the gradients are then taken in this same pass, each chunk's logits serving both directions.
    hidden_grad_dtype: grad_hidden's dtype (default: hidden's); tile_bytes: the logits tile's size (default
    _TILE_BYTES)."""
    dtype = _compute_dtype(hidden, weight)
    n, vocab = hidden.shape[0], weight.shape[0]
    index, rows, row_labels = _valid_rows(hidden, labels, ignore_index)
    if index is not None and grad_logprob is not None:
        grad_logprob = grad_logprob.index_select(0, index)
        grad_entropy = None if grad_entropy is None else grad_entropy.index_select(0, index)
    m = rows.shape[0]
    if token_grad is not None:
        token_grad = token_grad if index is None else token_grad.select(index)
        grad_logprob = torch.empty(m, dtype=dtype, device=hidden.device)  # filled chunk by chunk
        grad_entropy = token_grad.grad_entropy
    logprob = torch.empty(m, dtype=dtype, device=hidden.device)
    entropy = torch.empty(m, dtype=dtype, device=hidden.device) if want_entropy else None
    top = torch.empty(m, dtype=dtype, device=hidden.device)
    want_grad = grad_logprob is not None
    grad_rows = torch.empty(m, hidden.shape[1], dtype=hidden_grad_dtype or hidden.dtype, device=hidden.device) \
        if want_grad and want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=dtype, device=weight.device) if want_grad and want_weight else None
    grad_bias = torch.zeros(vocab, dtype=dtype, device=weight.device) if want_grad and want_bias else None
    step = max(1, min(m, chunk_rows(vocab, tile_bytes or _TILE_BYTES, torch.finfo(dtype).bits // 8)))
    tile = torch.empty(step if m else 0, vocab, dtype=dtype, device=hidden.device)
    for r0 in range(0, m, step):
        r1 = min(r0 + step, m)
        h = rows[r0:r1]
        z = _logits(h, weight, bias, dtype, tile[:r1 - r0])
        if token_grad is not None:  # the log-probabilities first, then their gradient over the same logits
            lp, _, _ = dispatch("logprob_rows", z.device.type, z, row_labels[r0:r1], False, None, None)
            grad_logprob[r0:r1] = token_grad.grad(lp, r0, r1)
        g = None if not want_grad else grad_logprob[r0:r1].to(dtype)
        e = None if grad_entropy is None else grad_entropy[r0:r1].to(dtype)
        lp, ent, best = dispatch("logprob_rows", z.device.type, z, row_labels[r0:r1], want_entropy, g, e)
        logprob[r0:r1] = lp
        top[r0:r1] = best
        if want_entropy:
            entropy[r0:r1] = ent
        if not want_grad:
            continue
        if grad_rows is not None:
            grad_rows[r0:r1] = _times_weight(z, weight)
        if grad_weight is not None:
            grad_weight.addmm_(z.t(), h.to(dtype))
        if grad_bias is not None:
            grad_bias.add_(z.sum(0))
    grad_hidden = grad_rows
    if index is not None:  # back to all N rows: ignored rows get logprob 0, entropy 0, no gradient
        logprob = logprob.new_zeros(n).index_copy_(0, index, logprob)
        top = top.new_zeros(n).index_copy_(0, index, top)
        entropy = None if entropy is None else entropy.new_zeros(n).index_copy_(0, index, entropy)
        if grad_rows is not None:
            grad_hidden = grad_rows.new_zeros(hidden.shape).index_copy_(0, index, grad_rows)
        if token_grad is not None:
            grad_logprob = grad_logprob.new_zeros(n).index_copy_(0, index, grad_logprob)
    return _Pass(logprob, entropy, top, grad_hidden, grad_weight, grad_bias,
                 grad_logprob if token_grad is not None else None)


def _check_labels(labels: Tensor, vocab: int, ignore_index: int) -> None:
    check_values(labels, vocab, ignore_index, torch.ones((), dtype=torch.float64, device=labels.device))


@torch.library.custom_op("fastft::fused_linear_logprobs", mutates_args=())
def fused_linear_logprobs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                          want_entropy: bool, hidden_grad_in_forward: bool = False
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    _check_labels(labels, weight.shape[0], ignore_index)
    dtype = _compute_dtype(hidden, weight)
    # with hidden_grad_in_forward: d logprob / d hidden of each row (a unit incoming gradient), same chunks' logits
    unit = torch.ones(hidden.shape[0], dtype=dtype, device=hidden.device) if hidden_grad_in_forward else None
    logprob, entropy, top, dlogprob_dhidden, *_ = _run(hidden, weight, bias, labels, ignore_index, want_entropy, unit,
                                                       None, hidden_grad_in_forward, False, False,
                                                       hidden_grad_dtype=dtype)
    return (logprob, _empty(logprob) if entropy is None else entropy, top,
            _empty(logprob) if dlogprob_dhidden is None else dlogprob_dhidden)


@fused_linear_logprobs.register_fake
def _(hidden, weight, bias, labels, ignore_index, want_entropy, hidden_grad_in_forward=False):
    dtype = _compute_dtype(hidden, weight)
    n = hidden.shape[0]
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n if want_entropy else 0, dtype=dtype),
            hidden.new_empty(n, dtype=dtype), hidden.new_empty(hidden.shape if hidden_grad_in_forward else 0,
                                                               dtype=dtype))


@torch.library.custom_op("fastft::fused_linear_logprobs_backward", mutates_args=())
def fused_linear_logprobs_backward(grad_logprob: Tensor, grad_entropy: Optional[Tensor], hidden: Tensor,
                                   weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                                   want_hidden: bool, want_weight: bool, want_bias: bool
                                   ) -> tuple[Tensor, Tensor, Tensor]:
    _, _, _, grad_hidden, grad_weight, grad_bias, _ = _run(
        hidden, weight, bias, labels, ignore_index, False, grad_logprob, grad_entropy, want_hidden, want_weight,
        want_bias, tile_bytes=_WEIGHT_GRAD_TILE_BYTES if want_weight else None)
    return (_empty(hidden) if grad_hidden is None else grad_hidden,
            _empty(weight) if grad_weight is None else grad_weight.to(weight.dtype),
            _empty(hidden) if grad_bias is None else grad_bias.to(bias.dtype))


@fused_linear_logprobs_backward.register_fake
def _(grad_logprob, grad_entropy, hidden, weight, bias, labels, ignore_index, want_hidden, want_weight, want_bias):
    return (hidden.new_empty(hidden.shape if want_hidden else 0),
            weight.new_empty(weight.shape if want_weight else 0),
            hidden.new_empty(bias.shape if want_bias else 0))


def _logprobs_setup(ctx, inputs, output):
    hidden, weight, bias, labels, ignore_index, *_ = inputs
    ctx.save_for_backward(hidden, weight, bias, labels, output[3])
    ctx.ignore_index = ignore_index
    ctx.mark_non_differentiable(output[2], output[3])
    ctx.set_materialize_grads(False)


def _logprobs_backward(ctx, grad_logprob, grad_entropy, _top, _dlogprob_dhidden):
    hidden, weight, bias, labels, dlogprob_dhidden = ctx.saved_tensors
    wants = ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2]
    if grad_logprob is None and grad_entropy is None:
        return (None,) * 7
    if grad_entropy is not None and not grad_entropy.numel():
        grad_entropy = None
    if dlogprob_dhidden.numel() and grad_entropy is None and not (wants[1] or wants[2]):
        # the forward took d logprob / d hidden: the chain rule row by row, no GEMM
        grad_hidden = (grad_logprob.to(dlogprob_dhidden.dtype)[:, None] * dlogprob_dhidden).to(hidden.dtype)
        return (grad_hidden if wants[0] else None,) + (None,) * 6
    if grad_logprob is None:
        grad_logprob = torch.zeros(hidden.shape[0], dtype=grad_entropy.dtype, device=hidden.device)
    grads = fused_linear_logprobs_backward(grad_logprob, grad_entropy, hidden, weight, bias, labels,
                                           ctx.ignore_index, *wants)
    grad_hidden, grad_weight, grad_bias = (g if want else None for g, want in zip(grads, wants))
    return grad_hidden, grad_weight, grad_bias, None, None, None, None


fused_linear_logprobs.register_autograd(_logprobs_backward, setup_context=_logprobs_setup)


@torch.library.custom_op("fastft::fused_linear_nll", mutates_args=())
def fused_linear_nll(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, ignore_index: int,
                     denominator: Tensor, want_hidden: bool, want_weight: bool, want_bias: bool
                     ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    check_values(labels, weight.shape[0], ignore_index, denominator)
    any_grad = want_hidden or want_weight or want_bias
    scale = None
    if any_grad:  # d loss / d logprob of every row: -1 / denominator
        scale = (-1.0 / denominator.to(torch.float64)).to(_compute_dtype(hidden, weight)).expand(hidden.shape[0])
    logprob, _, _, grad_hidden, grad_weight, grad_bias, _ = _run(hidden, weight, bias, labels, ignore_index, False,
                                                              scale, None, want_hidden, want_weight, want_bias)
    loss = (-logprob.sum() / denominator).to(logprob.dtype)
    return (loss, _empty(hidden) if grad_hidden is None else grad_hidden,
            _empty(weight) if grad_weight is None else grad_weight.to(weight.dtype),
            _empty(hidden) if grad_bias is None else grad_bias.to(bias.dtype))


@fused_linear_nll.register_fake
def _(hidden, weight, bias, labels, ignore_index, denominator, want_hidden, want_weight, want_bias):
    return (hidden.new_empty((), dtype=_compute_dtype(hidden, weight)),
            hidden.new_empty(hidden.shape if want_hidden else 0),
            weight.new_empty(weight.shape if want_weight else 0),
            hidden.new_empty(bias.shape if want_bias else 0))


def _nll_setup(ctx, inputs, output):
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(*output[1:])
    ctx.set_materialize_grads(False)


def _nll_backward(ctx, grad_loss, *_):
    if grad_loss is None:
        return (None,) * 9
    wants = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
    # An incoming gradient of exactly 1 (a loss's usual one) hands the precomputed gradients over without a copy.
    unit = type(grad_loss) is torch.Tensor and bool(grad_loss == 1)
    grads = tuple(g if unit or not g.numel() else g * grad_loss.to(g.dtype) for g in ctx.saved_tensors)
    grad_hidden, grad_weight, grad_bias = (g if want else None for g, want in zip(grads, wants))
    return (grad_hidden, grad_weight, grad_bias) + (None,) * 6


fused_linear_nll.register_autograd(_nll_backward, setup_context=_nll_setup)
