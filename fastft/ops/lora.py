"""torch.library ops for LoRA.

- fastft::lora_dropout(x, p, seed): x * keep / (1 - p), the mask a pure function of (seed, flat index)
  (fastft/reference/lora.py). CPU: C++; CUDA: Triton.
- fastft::lora_deltas(x, As, Bs, scales, p, seeds, biases, has_bias) -> (deltas, u): peft's LoRA terms of a group
  of adapters reading one x (the active adapters of a layer, or those of sibling projections such as q/k/v),
  adapter g giving delta_g = scale_g * (u_g @ B_g^T + bias_g) with u = [dropout_g(x.to(A.dtype)) @ A_g^T]_g, all
  rank-r products in one (M, sum of ranks) tensor u (returned so autograd can save it; callers use the deltas).
  biases holds the lora biases of the adapters g with has_bias[g], in order (no None holes: autograd tracks the
  tensors of lists of tensors only). Backward, rank-r first:
      dB_g = scale_g dy_g^T u_g,  du_g = scale_g dy_g B_g,  dA_g = du_g^T dropout_g(x),
      dx = sum_g dropout_g'(du_g A_g),  dbias_g = scale_g sum dy_g.
  Without dropout the group's down-projection, dA and dx are each one GEMM over the concatenated A (x read once);
  with dropout the CPU path runs them per adapter, and the Triton kernels regenerate each adapter's mask in their
  tiles (kernels/lora.py). Saved for backward: x itself (shared by the whole group; no fp32 copy when x is half
  precision) and u (sum of ranks * itemsize(A) bytes per token). Dropout masks and dropout(x) are regenerated.
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from fastft.ops.backend import backend_for, native_extension
from fastft.reference import lora as ref


@torch.library.custom_op("fastft::lora_dropout", mutates_args=())
def lora_dropout(x: Tensor, p: float, seed: int) -> Tensor:
    return ref.lora_dropout_ref(x, p, seed)


@lora_dropout.register_kernel(("cpu", "cuda"))
def _(x, p, seed):
    ref.dropout_threshold(p)  # validates p
    backend = backend_for(x.device.type)
    if backend == "native":
        return native_extension().lora_dropout(x, p, seed)
    if backend == "triton":
        from fastft.kernels import lora as triton_lora

        return triton_lora.lora_dropout(x.contiguous(), p, seed)
    return ref.lora_dropout_ref(x, p, seed)


@lora_dropout.register_fake
def _(x, p, seed):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _dropped(x: Tensor, dtype: torch.dtype, p: float, seed: int) -> Tensor:
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    return lora_dropout(rows.contiguous(), p, seed) if p > 0 else rows


@functools.lru_cache(maxsize=64)
def _cached_group(ranks: tuple, p: float, seeds: tuple, device: torch.device):
    from fastft.kernels import lora as triton_lora

    return triton_lora.AdapterGroup(list(ranks), p, list(seeds), device)


def _adapter_group(ranks: list[int], p: float, seeds: list[int], device: torch.device):
    """The kernels' view of a group (small device tensors): built once per call of the op and reused by its backward's
    two kernels, which see the same ranks and seeds."""
    return _cached_group(tuple(ranks), p, tuple(seeds), device)


def _down(x: Tensor, A_cat: Tensor, ranks: list[int], p: float, seeds: list[int]) -> Tensor:
    """u (M, sum of ranks) in A's dtype: [dropout_g(x) @ A_g^T]_g."""
    if backend_for(x.device.type) == "triton":
        from fastft.kernels import lora as triton_lora

        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return triton_lora.lora_down(rows, A_cat, _adapter_group(ranks, p, seeds, x.device))
    if p == 0:
        return _dropped(x, A_cat.dtype, 0.0, 0) @ A_cat.t()
    parts = A_cat.split(ranks)
    return torch.cat([_dropped(x, A_cat.dtype, p, seed) @ A.t() for A, seed in zip(parts, seeds)], dim=1)


def _grad_A(du: Tensor, x: Tensor, ranks: list[int], p: float, seeds: list[int]) -> Tensor:
    """dA (sum of ranks, K) in du's dtype: [du_g^T dropout_g(x)]_g."""
    if backend_for(x.device.type) == "triton":
        from fastft.kernels import lora as triton_lora

        rows = x.reshape(-1, x.shape[-1]).contiguous()
        return triton_lora.lora_grad_a(du.contiguous(), rows, _adapter_group(ranks, p, seeds, x.device))
    if p == 0:
        return du.t() @ _dropped(x, du.dtype, 0.0, 0)
    return torch.cat([d.t() @ _dropped(x, du.dtype, p, seed) for d, seed in zip(du.split(ranks, dim=1), seeds)])


def _grad_x(du: Tensor, A_cat: Tensor, ranks: list[int], p: float, seeds: list[int], dtype: torch.dtype) -> Tensor:
    """dx rows (M, K) in `dtype`: sum_g dropout_g(du_g @ A_g)."""
    if backend_for(du.device.type) == "triton":
        from fastft.kernels import lora as triton_lora

        return triton_lora.lora_grad_x(du.contiguous(), A_cat, _adapter_group(ranks, p, seeds, du.device), dtype)
    if p == 0:
        return (du @ A_cat).to(dtype)
    grad = None
    for d, A, seed in zip(du.split(ranks, dim=1), A_cat.split(ranks), seeds):
        term = _dropped(d @ A, A.dtype, p, seed)
        grad = term if grad is None else grad.add_(term)
    return grad.to(dtype)


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


@torch.library.custom_op("fastft::lora_deltas", mutates_args=())
def lora_deltas(x: Tensor, lora_As: list[Tensor], lora_Bs: list[Tensor], scales: list[float], dropout_p: float,
                seeds: list[int], lora_biases: list[Tensor], has_bias: list[bool]) -> tuple[list[Tensor], Tensor]:
    _check_group(x, lora_As, lora_Bs, scales, seeds, lora_biases, has_bias)
    ranks = [A.shape[0] for A in lora_As]
    u = _down(x, _concatenated(lora_As), ranks, dropout_p, seeds)
    deltas = []
    bias_of = _bias_of(lora_biases, has_bias)
    for u_g, B, bias, scale in zip(u.split(ranks, dim=1), lora_Bs, bias_of, scales):
        # Scaled after the product, as peft does (same rounding), in place: no second (tokens, out) tensor.
        delta = torch.nn.functional.linear(u_g.to(B.dtype), B, bias).mul_(scale)
        deltas.append(delta.reshape(*x.shape[:-1], B.shape[0]))
    return deltas, u


@lora_deltas.register_fake
def _(x, lora_As, lora_Bs, scales, dropout_p, seeds, lora_biases, has_bias):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    deltas = [x.new_empty(*x.shape[:-1], B.shape[0], dtype=B.dtype) for B in lora_Bs]
    return deltas, x.new_empty(rows, sum(A.shape[0] for A in lora_As), dtype=lora_As[0].dtype)


def _setup_context(ctx, inputs, output):
    x, lora_As, lora_Bs, scales, dropout_p, seeds, lora_biases, has_bias = inputs
    ctx.save_for_backward(x, output[1], *lora_As, *lora_Bs)
    ctx.scales, ctx.dropout_p, ctx.seeds, ctx.size = scales, dropout_p, seeds, len(lora_As)
    ctx.has_bias = has_bias


def _any(flags) -> bool:
    # needs_input_grad holds a list of flags for a list input in eager autograd, one flag under AOT dispatch.
    return any(flags) if isinstance(flags, (list, tuple)) else bool(flags)


def _backward(ctx, grad_deltas, grad_u):
    x, u, *weights = ctx.saved_tensors
    lora_As, lora_Bs = weights[:ctx.size], weights[ctx.size:]
    ranks = [A.shape[0] for A in lora_As]
    needs_x, needs_As, needs_Bs, needs_biases = (_any(ctx.needs_input_grad[i]) for i in (0, 1, 2, 6))
    grad_Bs, grad_biases, du = [None] * ctx.size, [], []
    for g, (dy, B, u_g, scale) in enumerate(zip(grad_deltas, lora_Bs, u.split(ranks, dim=1), ctx.scales)):
        dy = dy.reshape(-1, dy.shape[-1]).to(B.dtype)
        if needs_Bs:
            grad_Bs[g] = torch.mm(dy.t(), u_g.to(B.dtype)).mul_(scale)
        if ctx.has_bias[g]:
            accumulate = torch.promote_types(dy.dtype, torch.float32)
            grad_biases.append(dy.sum(0, dtype=accumulate).mul_(scale).to(B.dtype) if needs_biases else None)
        if needs_x or needs_As:
            du.append(torch.mm(dy, B).mul_(scale).to(lora_As[0].dtype))
    grad_x, grad_As = None, [None] * ctx.size
    if needs_x or needs_As:
        du = torch.cat(du, dim=1) if len(du) > 1 else du[0]
        if grad_u is not None:
            du = du + grad_u
        if needs_As:
            grad_As = list(_grad_A(du, x, ranks, ctx.dropout_p, ctx.seeds).split(ranks))
        if needs_x:
            A_cat = _concatenated(lora_As)
            grad_x = _grad_x(du, A_cat, ranks, ctx.dropout_p, ctx.seeds, x.dtype).reshape(x.shape)
    return grad_x, grad_As, grad_Bs, None, None, None, grad_biases, None


lora_deltas.register_autograd(_backward, setup_context=_setup_context)


def lora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float, seed: int,
               lora_bias: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """One adapter's term: `lora_deltas` on a group of one, returning (delta, u)."""
    biases = [] if lora_bias is None else [lora_bias]
    deltas, u = lora_deltas(x, [lora_A], [lora_B], [scale], dropout_p, [seed], biases, [lora_bias is not None])
    return deltas[0], u
