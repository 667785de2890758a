"""torch.library ops for LoRA.

- fastft::lora_dropout(x, p, seed): x * keep / (1 - p), the mask a pure function of (seed, flat index)
  (fastft/reference/lora.py). CPU: C++; CUDA: Triton.
- fastft::lora_delta(x, A, B, scale, p, seed, lora_bias) -> (delta, u): peft's LoRA term
  delta = scale * (u @ B^T + lora_bias) with u = dropout(x.to(A.dtype)) @ A^T (u is returned so autograd can
  save it; callers use delta). Rank-r products come first in backward:
      dB = scale * dy^T u,  du = scale * dy B,  dA = du^T dropout(x),  dx = dropout'(du A),  dbias = scale * sum dy.
  Saved for backward: x itself (the layer input, shared by every adapter reading it; no fp32 copy when x is
  half precision) and u (r * itemsize(A) bytes per token). The dropout mask and dropout(x) are regenerated.
"""

from __future__ import annotations

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


@torch.library.custom_op("fastft::lora_delta", mutates_args=())
def lora_delta(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float, seed: int,
               lora_bias: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    u = _dropped(x, lora_A.dtype, dropout_p, seed) @ lora_A.t()
    # Scaled after the product, as peft does (same rounding), in place: no second (tokens, out) tensor.
    delta = torch.nn.functional.linear(u.to(lora_B.dtype), lora_B, lora_bias).mul_(scale)
    return delta.reshape(*x.shape[:-1], lora_B.shape[0]), u


@lora_delta.register_fake
def _(x, lora_A, lora_B, scale, dropout_p, seed, lora_bias):
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    return (x.new_empty(*x.shape[:-1], lora_B.shape[0], dtype=lora_B.dtype),
            x.new_empty(rows, lora_A.shape[0], dtype=lora_A.dtype))


def _setup_context(ctx, inputs, output):
    x, lora_A, lora_B, scale, dropout_p, seed, lora_bias = inputs
    ctx.save_for_backward(x, lora_A, lora_B, output[1])
    ctx.scale, ctx.dropout_p, ctx.seed = scale, dropout_p, seed
    ctx.has_bias = lora_bias is not None


def _backward(ctx, grad_delta, grad_u):
    x, lora_A, lora_B, u = ctx.saved_tensors
    dy = grad_delta.reshape(-1, grad_delta.shape[-1]).to(lora_B.dtype)
    grad_x = grad_A = grad_B = grad_bias = None
    if ctx.needs_input_grad[2]:
        grad_B = torch.mm(dy.t(), u.to(lora_B.dtype)).mul_(ctx.scale)
    if ctx.has_bias and ctx.needs_input_grad[6]:
        grad_bias = dy.sum(0, dtype=torch.promote_types(dy.dtype, torch.float32)).mul_(ctx.scale).to(lora_B.dtype)
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        du = torch.mm(dy, lora_B).mul_(ctx.scale).to(lora_A.dtype)
        if grad_u is not None:
            du = du + grad_u
        if ctx.needs_input_grad[1]:
            grad_A = torch.mm(du.t(), _dropped(x, lora_A.dtype, ctx.dropout_p, ctx.seed))
        if ctx.needs_input_grad[0]:
            grad_rows = _dropped(torch.mm(du, lora_A), lora_A.dtype, ctx.dropout_p, ctx.seed)
            grad_x = grad_rows.to(x.dtype).reshape(x.shape)
    return grad_x, grad_A, grad_B, None, None, None, grad_bias


lora_delta.register_autograd(_backward, setup_context=_setup_context)
