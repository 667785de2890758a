"""torch.library ops for LoRA.

- fastft::lora_dropout(x, p, seed): x * keep / (1 - p), the mask a pure function of (seed, flat index)
  (fastft/reference/lora.py).
- fastft::lora_down(x, As, p, seeds) -> u: the rank-r products of a group of adapters reading one x (the active
  adapters of a layer, or those of sibling projections such as q/k/v), u = [dropout_g(x.to(A.dtype)) @ A_g^T]_g
  side by side in one (M, sum of ranks) tensor. Backward, for du:
      dA_g = du_g^T dropout_g(x),  dx = sum_g dropout_g'(du_g A_g).
  Without dropout the down-projection, dA and dx are each one GEMM over the concatenated A (x read once); with
  dropout the C++ path runs them over row chunks of about 2 MiB, dropping each chunk into a cache-sized buffer per
  adapter (dropout(x) is never written whole), and the Triton kernels regenerate each adapter's mask in their
  tiles (kernels/lora.py). Saved for backward: x itself (shared by the whole group; no fp32 copy when x is half
  precision). Dropout masks and dropout(x) are regenerated, never stored.
- The up-projections are ATen GEMMs under autograd (which saves u_g, sum of ranks * itemsize(A) bytes per token):
  `lora_up` gives peft's term scale_g * (u_g @ B_g^T + bias_g), and `add_lora_up` accumulates it into the base
  layer's output in place (addmm_), so no (tokens, out) term is written and added. `lora_deltas` / `lora_delta`
  return the terms of a group / one adapter.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.formats.lora import dropout_threshold
from fastft.ops.routing import dispatch, runs_directly


@torch.library.custom_op("fastft::lora_dropout", mutates_args=())
def lora_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    dropout_threshold(p)  # validates p
    return dispatch("lora_dropout", x.device.type, x, p, seed)


@lora_dropout.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _check_group(x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float], seeds: list[int],
                 lora_biases: list[Tensor], has_bias: list[bool]) -> None:
    if not lora_As or not len(lora_As) == len(lora_Bs) == len(scales) == len(seeds) == len(has_bias):
        raise ValueError("lora_As, lora_Bs, scales, seeds and has_bias must be non-empty lists of one length, got "
                         f"{len(lora_As)}, {len(lora_Bs)}, {len(scales)}, {len(seeds)}, {len(has_bias)}")
    if len(lora_biases) != sum(has_bias):
        raise ValueError(f"lora_biases must hold one bias per True in has_bias ({sum(has_bias)}), "
                         f"got {len(lora_biases)}")
    for g, (A, B) in enumerate(zip(lora_As, lora_Bs)):
        if A.dtype != lora_As[0].dtype:
            raise TypeError(f"lora_As[{g}] is {A.dtype}, lora_As[0] is {lora_As[0].dtype}: a group has one A dtype")
        if A.dim() != 2 or A.shape[1] != x.shape[-1]:
            raise ValueError(f"lora_As[{g}] must be (rank, {x.shape[-1]}) for x of last dim {x.shape[-1]}, "
                             f"got {tuple(A.shape)}")
        if B.dim() != 2 or B.shape[1] != A.shape[0]:
            raise ValueError(f"lora_Bs[{g}] must be (out_features, {A.shape[0]}), got {tuple(B.shape)}")


def _bias_of(lora_biases: list[Tensor], has_bias: list[bool]) -> list[Optional[Tensor]]:
    biases = iter(lora_biases)
    return [next(biases) if present else None for present in has_bias]


def _concatenated(lora_As: list[Tensor]) -> Tensor:
    return lora_As[0].contiguous() if len(lora_As) == 1 else torch.cat(lora_As)


_FEW_ROWS = 16  # decode-sized calls


def _lora_down(x: Tensor, lora_As: list[Tensor], dropout_p: float, seeds: list[int]) -> Tensor:
    rows = x.reshape(-1, x.shape[-1])
    if dropout_p == 0 and len(lora_As) > 1 and rows.shape[0] <= _FEW_ROWS and not torch.is_grad_enabled():
        # a few rows (decoding): one small product per adapter costs less than copying every A into one matrix
        return torch.cat([torch.mm(rows.to(A.dtype), A.t()) for A in lora_As], dim=1)
    return dispatch("lora_down", x.device.type, rows, _concatenated(lora_As), [A.shape[0] for A in lora_As],
                    dropout_p, seeds)


@torch.library.custom_op("fastft::lora_down", mutates_args=())
def lora_down_op(x: Tensor, lora_As: list[Tensor], dropout_p: float, seeds: list[int]) -> Tensor:
    """u = [dropout_g(x.to(A.dtype)) @ A_g^T]_g, (tokens, sum of ranks) in A's dtype."""
    return _lora_down(x, lora_As, dropout_p, seeds)


def lora_down(x: Tensor, lora_As: list[Tensor], dropout_p: float, seeds: list[int]) -> Tensor:
    """fastft::lora_down, or its implementation called directly where nothing would see the op
    (`routing.runs_directly`: e.g. generation under no_grad)."""
    if runs_directly(x, *lora_As):
        return _lora_down(x, lora_As, dropout_p, seeds)
    return lora_down_op(x, lora_As, dropout_p, seeds)


@lora_down_op.register_fake
def _(x, lora_As, dropout_p, seeds):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return x.new_empty(rows, sum(A.shape[0] for A in lora_As), dtype=lora_As[0].dtype)


def _setup_down(ctx, inputs, output):
    x, lora_As, dropout_p, seeds = inputs
    ctx.save_for_backward(x, *lora_As)
    ctx.dropout_p, ctx.seeds = dropout_p, seeds


def _any(flags) -> bool:
    # needs_input_grad holds a list of flags for a list input in eager autograd, one flag under AOT dispatch.
    return any(flags) if isinstance(flags, (list, tuple)) else bool(flags)


@torch.library.custom_op("fastft::lora_down_backward", mutates_args=())
def lora_down_backward(du: Tensor, x: Tensor, lora_A_cat: Tensor, ranks: list[int], dropout_p: float,
                       seeds: list[int], want_x: bool, want_A: bool) -> tuple[Tensor, Tensor]:
    """(dx in x's shape and dtype, dA (sum of ranks, K) in A's dtype) for du (M, sum of ranks) in A's dtype; an
    empty tensor for a gradient not wanted. dx is not a view, so autograd can add the base layer's dx into it in
    place (a view costs a fresh (tokens, in) tensor for that sum)."""
    grad_x, grad_A = dispatch("lora_down_backward", du.device.type, du, x, lora_A_cat, ranks, dropout_p, seeds,
                              want_x, want_A)
    grad_x = torch.ops.aten._unsafe_view.default(grad_x, x.shape) if want_x else x.new_empty(0)
    return grad_x, grad_A if want_A else du.new_empty(0)


@lora_down_backward.register_fake
def _(du, x, lora_A_cat, ranks, dropout_p, seeds, want_x, want_A):
    return (x.new_empty(x.shape) if want_x else x.new_empty(0),
            du.new_empty(lora_A_cat.shape) if want_A else du.new_empty(0))


def _backward_down(ctx, du):
    x, *lora_As = ctx.saved_tensors
    ranks = [A.shape[0] for A in lora_As]
    want_x, want_A = bool(ctx.needs_input_grad[0]), _any(ctx.needs_input_grad[1])
    grad_x, grad_A = lora_down_backward(du.to(lora_As[0].dtype), x, _concatenated(lora_As), ranks, ctx.dropout_p,
                                        ctx.seeds, want_x, want_A)
    return grad_x if want_x else None, list(grad_A.split(ranks)) if want_A else [None] * len(ranks), None, None


lora_down_op.register_autograd(_backward_down, setup_context=_setup_down)


def lora_up(u_g: Tensor, lora_B: Tensor, scale: float, lora_bias: Optional[Tensor] = None) -> Tensor:
    """One adapter's term from its rank-r product: scale * (u_g @ B^T + bias), scaled after the product as peft
    does (same rounding), in place: no second (tokens, out) tensor."""
    return torch.nn.functional.linear(u_g.to(lora_B.dtype), lora_B, lora_bias).mul_(scale)


def add_lora_up(result: Tensor, u_g: Tensor, lora_B: Tensor, scale: float,
                lora_bias: Optional[Tensor] = None) -> Tensor:
    """result += scale * (u_g @ B^T + bias) in place, the product accumulated into result by the GEMM (one pass
    over result, no (tokens, out) temporary). result (rows, out) must have B's dtype and be free to modify."""
    result.addmm_(u_g.to(lora_B.dtype), lora_B.t(), alpha=scale)
    return result if lora_bias is None else result.add_(lora_bias, alpha=scale)


def lora_deltas(x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float], dropout_p: float,
                seeds: list[int], lora_biases: list[Tensor], has_bias: list[bool]) -> tuple[list[Tensor], Tensor]:
    """(deltas, u): each adapter's term delta_g = scale_g * (u_g @ B_g^T + bias_g), shaped like x with B_g's out
    features, and u = fastft::lora_down (all rank-r products side by side)."""
    _check_group(x, lora_As, lora_Bs, scales, seeds, lora_biases, has_bias)
    ranks = [A.shape[0] for A in lora_As]
    u = lora_down(x, lora_As, dropout_p, seeds)
    deltas = [lora_up(u_g, B, scale, bias).reshape(*x.shape[:-1], B.shape[0])
              for u_g, B, bias, scale in zip(u.split(ranks, dim=1), lora_Bs, _bias_of(lora_biases, has_bias), scales)]
    return deltas, u


def lora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float, seed: int,
               lora_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One adapter's term: `lora_deltas` on a group of one, returning (delta, u)."""
    biases = [] if lora_bias is None else [lora_bias]
    deltas, u = lora_deltas(x, [lora_A], [lora_B], [scale], dropout_p, [seed], biases, [lora_bias is not None])
    return deltas[0], u
