"""torch.library ops on packed 4-bit weights (bitsandbytes NF4/FP4 layout).

Every op takes the weight as the same 8 arguments, the "packed weight" W:
    packed (uint8, ((N*K+1)//2, 1)), absmax (fp32 per block, or uint8 codes when double-quantized), code (16 fp32),
    blocksize, nested_absmax (fp32 per 256 blocks, or None), nested_code (256 fp32, or None), nested_blocksize,
    nested_offset.
- fastft::nf4_dequantize(W, shape, dtype) -> the dense weight.
- fastft::nf4_dequantize_into(out, W): the same, written into a preallocated contiguous `out` (reusing memory
  avoids the page faults of a fresh large tensor, which on CPU cost more than the dequantization itself).
- fastft::nf4_linear(x, W, out_features, bias) -> x @ W^T + bias, any leading dims of x. Autograd: dx via
  nf4_linear_grad_input, dbias = sum of dy (at least fp32 accumulation); W gets no gradient. Saved for backward: nothing
  per token (0 bytes/token): W's own tensors and the bias are referenced, not copied.
- fastft::nf4_linear_grad_input(dy, W, in_features) -> dy @ W. Its own backward is nf4_linear, so double backward works.
- fastft::nf4_quantize(weight, blocksize, quant_type) -> (packed, absmax): the 4-bit codes and fp32 block scales.
Implementations per backend: fastft/ops/backends/ (the routing table, fastft/ops/routing.py, picks one).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.ops.routing import dispatch, runs_directly


@torch.library.custom_op("fastft::nf4_quantize", mutates_args=())
def nf4_quantize(weight: Tensor, blocksize: int, quant_type: str) -> tuple[Tensor, Tensor]:
    """(packed uint8 ((numel+1)//2, 1), fp32 absmax per block) of a contiguous float weight; no autograd."""
    return dispatch("nf4_quantize", weight.device.type, weight, blocksize, quant_type)


@nf4_quantize.register_fake
def _(weight, blocksize, quant_type):
    blocks = -(-weight.numel() // blocksize)
    return (weight.new_empty(((weight.numel() + 1) // 2, 1), dtype=torch.uint8),
            weight.new_empty(blocks, dtype=torch.float32))


@torch.library.custom_op("fastft::nf4_dequantize", mutates_args=())
def nf4_dequantize(
    packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], nested_blocksize: int, nested_offset: float, shape: list[int], dtype: torch.dtype,
) -> Tensor:
    return dispatch("nf4_dequantize", packed.device.type, packed, absmax, code, blocksize, nested_absmax, nested_code,
                    nested_blocksize, nested_offset, list(shape), dtype)


@nf4_dequantize.register_fake
def _(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset, shape, dtype):
    return packed.new_empty(shape, dtype=dtype)


@torch.library.custom_op("fastft::nf4_dequantize_into", mutates_args=("out",))
def nf4_dequantize_into(
    out: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], nested_blocksize: int, nested_offset: float,
) -> None:
    dispatch("nf4_dequantize_into", packed.device.type, out, packed, absmax, code, blocksize, nested_absmax,
             nested_code, nested_blocksize, nested_offset)


@nf4_dequantize_into.register_fake
def _(out, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset):
    return None


def _as_rows(x: Tensor) -> Tensor:
    return x.reshape(-1, x.shape[-1]).contiguous()


def nf4_linear(x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int,
               nested_absmax: Optional[Tensor], nested_code: Optional[Tensor], nested_blocksize: int,
               nested_offset: float, out_features: int, bias: Optional[Tensor]) -> Tensor:
    """fastft::nf4_linear, or its implementation called directly where nothing would see the op
    (`routing.runs_directly`: e.g. generation under no_grad)."""
    op = _nf4_linear if runs_directly(x, bias) else nf4_linear_op
    return op(x, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset,
              out_features, bias)


@torch.library.custom_op("fastft::nf4_linear", mutates_args=())
def nf4_linear_op(
    x: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], nested_blocksize: int, nested_offset: float, out_features: int,
    bias: Optional[Tensor],
) -> Tensor:
    return _nf4_linear(x, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize,
                       nested_offset, out_features, bias)


def _nf4_linear(x, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset,
                out_features, bias):
    y = dispatch("nf4_linear", x.device.type, _as_rows(x), packed, absmax, code, blocksize, nested_absmax,
                 nested_code, nested_blocksize, nested_offset, out_features, bias)
    # Not a view of y (as matmul folds leading dims): callers may add into the output in place, which autograd
    # forbids on a view made inside a custom op.
    return torch.ops.aten._unsafe_view.default(y, [*x.shape[:-1], out_features])


@nf4_linear_op.register_fake
def _(x, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset, out_features,
      bias):
    return x.new_empty(*x.shape[:-1], out_features)


@torch.library.custom_op("fastft::nf4_linear_grad_input", mutates_args=())
def nf4_linear_grad_input(
    grad_out: Tensor, packed: Tensor, absmax: Tensor, code: Tensor, blocksize: int, nested_absmax: Optional[Tensor],
    nested_code: Optional[Tensor], nested_blocksize: int, nested_offset: float, in_features: int,
) -> Tensor:
    dx = dispatch("nf4_linear_grad_input", grad_out.device.type, _as_rows(grad_out), packed, absmax, code, blocksize,
                  nested_absmax, nested_code, nested_blocksize, nested_offset, in_features)
    return dx.reshape(*grad_out.shape[:-1], in_features)


@nf4_linear_grad_input.register_fake
def _(grad_out, packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset,
      in_features):
    return grad_out.new_empty(*grad_out.shape[:-1], in_features)


def _linear_setup_context(ctx, inputs, output):
    x, *weight, out_features, bias = inputs
    ctx.weight = tuple(weight)
    ctx.in_features = x.shape[-1]
    ctx.bias_dtype = None if bias is None else bias.dtype


def _linear_backward(ctx, grad_out):
    grad_x = grad_bias = None
    if ctx.needs_input_grad[0]:
        grad_x = nf4_linear_grad_input(grad_out, *ctx.weight, ctx.in_features)
    if ctx.needs_input_grad[10]:
        rows = grad_out.reshape(-1, grad_out.shape[-1])
        grad_bias = rows.sum(0, dtype=torch.promote_types(rows.dtype, torch.float32)).to(ctx.bias_dtype)
    return (grad_x,) + (None,) * 9 + (grad_bias,)


def _grad_input_setup_context(ctx, inputs, output):
    grad_out, *weight, in_features = inputs
    ctx.weight = tuple(weight)
    ctx.out_features = grad_out.shape[-1]


def _grad_input_backward(ctx, grad_grad_x):
    grad = nf4_linear(grad_grad_x, *ctx.weight, ctx.out_features, None) if ctx.needs_input_grad[0] else None
    return (grad,) + (None,) * 9


nf4_linear_op.register_autograd(_linear_backward, setup_context=_linear_setup_context)
nf4_linear_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup_context)
