"""The "triton" backend: fastft's Triton kernels (kernels/, installed as fastft.kernels), imported on first use.

Launchers whose names still differ from their op's: fake_quant_matmul(_grad_x, _grad_w) (the GEMMs of
fake_quant_linear and its backward), bottleneck_down + residual_matmul (the two passes of bottleneck_adapter),
lora_grad_x / lora_grad_a (the two parts of lora_down_backward): each is one step of its op, not the op.
"""

from __future__ import annotations

import functools
import itertools

import torch

from fastft.formats import qat as qat_format
from fastft.ops.routing import register_kernel

TRITON = "triton"


def _kernels(name: str):
    import importlib

    return importlib.import_module(f"fastft.kernels.{name}")


# 4-bit weights (kernels/nf4.py) -----------------------------------------------------------------------------------
@register_kernel("nf4_dequantize", TRITON)
def nf4_dequantize(*weight_shape_dtype):
    *weight, shape, dtype = weight_shape_dtype
    return _kernels("nf4").nf4_dequantize(*weight, shape, dtype)


@register_kernel("nf4_dequantize_into", TRITON)
def nf4_dequantize_into(out, *weight):
    _kernels("nf4").nf4_dequantize(*weight, list(out.shape), out.dtype, out=out)


@register_kernel("nf4_linear", TRITON)
def nf4_linear(rows, *weight_out_features_bias):
    return _kernels("nf4").nf4_linear(rows, *weight_out_features_bias)


@register_kernel("nf4_linear_grad_input", TRITON)
def nf4_linear_grad_input(rows, *weight_in_features):
    return _kernels("nf4").nf4_linear_grad_input(rows, *weight_in_features)


# LoRA (kernels/lora.py) -----------------------------------------------------------------------------------------
@register_kernel("lora_dropout", TRITON)
def lora_dropout(x, p, seed):
    return _kernels("lora").lora_dropout(x.contiguous(), p, seed)


@functools.lru_cache(maxsize=64)
def _cached_group(ranks: tuple, p: float, seeds: tuple, device: torch.device):
    return _kernels("lora").AdapterGroup(list(ranks), p, list(seeds), device)


def _adapter_group(ranks, p, seeds, device: torch.device):
    """The kernels' view of a group (small device tensors): built once per call of the op and reused by its backward's
    two kernels, which see the same ranks and seeds."""
    return _cached_group(tuple(ranks), p, tuple(seeds), device)


@register_kernel("lora_down", TRITON)
def lora_down(rows, A_cat, ranks, p, seeds):
    return _kernels("lora").lora_down(rows.contiguous(), A_cat, _adapter_group(ranks, p, seeds, rows.device))


@register_kernel("lora_down_backward", TRITON)
def lora_down_backward(du, x, A_cat, ranks, p, seeds, want_x, want_A):
    kernels = _kernels("lora")
    group = _adapter_group(ranks, p, seeds, du.device)
    du = du.contiguous()
    grad_x = kernels.lora_grad_x(du, A_cat, group, x.dtype) if want_x else None
    grad_A = kernels.lora_grad_a(du, x.reshape(-1, x.shape[-1]).contiguous(), group) if want_A else None
    return grad_x, grad_A


# Per-sample routed LoRA (kernels/routed_lora.py) -------------------------------------------------------------------
def _routed_fits(x, lora_As, *_) -> bool:
    return x.dtype != torch.float64 and lora_As[0].dtype != torch.float64


def _routed_inputs(lora_As, lora_Bs, scales, route, device):
    """(A_cat, B_cat, rank offsets, scales, Routing, rank tile) as the kernels take them."""
    kernels = _kernels("routed_lora")
    ranks = [A.shape[0] for A in lora_As]
    offsets = torch.tensor([0, *itertools.accumulate(ranks)], dtype=torch.int32, device=device)
    rank_tile = kernels.block_r(ranks)
    routing = kernels.Routing.of(route, len(ranks), kernels.block_m(rank_tile, lora_As[0].dtype))
    return (torch.cat(lora_As).contiguous(), torch.cat(lora_Bs, dim=1).contiguous(), offsets,
            torch.tensor(scales, dtype=torch.float32, device=device), routing, rank_tile)


@register_kernel("routed_lora", TRITON, supports=_routed_fits, declines="fp64")
def routed_lora(x, lora_As, lora_Bs, scales, route):
    return _kernels("routed_lora").routed_lora(x.contiguous(), *_routed_inputs(lora_As, lora_Bs, scales, route,
                                                                              x.device))


@register_kernel("routed_lora_backward", TRITON, supports=lambda dy, x, lora_As, *_: _routed_fits(x, lora_As),
                 declines="fp64")
def routed_lora_backward(dy, x, lora_As, lora_Bs, scales, route, want_x):
    ranks = [A.shape[0] for A in lora_As]
    dx, da, db = _kernels("routed_lora").routed_lora_backward(
        dy.to(lora_As[0].dtype).contiguous(), x.contiguous(),
        *_routed_inputs(lora_As, lora_Bs, scales, route, x.device), want_x)
    # separate tensors, not views of one (a custom op's outputs may not alias each other)
    return dx, [d.clone() for d in da.split(ranks)], [d.clone() for d in db.split(ranks, dim=1)]


# Bottleneck adapters (kernels/bottleneck.py) ----------------------------------------------------------------------
def _residual_in_parameter_dtype(v, base, w_down, b_down, w_up, *_) -> bool:
    return base.dtype == w_up.dtype


@register_kernel("bottleneck_adapter", TRITON, supports=_residual_in_parameter_dtype,
                 declines="a residual in another dtype than the parameters")
def bottleneck_adapter(v, base, w_down, b_down, w_up, b_up, activation, scale):
    kernels = _kernels("bottleneck")
    z, a = kernels.bottleneck_down(v.contiguous(), w_down, b_down, activation)
    return kernels.residual_matmul(base.contiguous(), a, w_up.t(), b_up, scale), z


@register_kernel("bottleneck_backward", TRITON)
def bottleneck_backward(dy, v, z, w_down, w_up, activation, scale, add_dy, need_dv, need_weights):
    from fastft.ops.backends.reference import bottleneck_weight_grads, no_grads

    kernels = _kernels("bottleneck")
    dy = dy.contiguous()
    dz = kernels.activation_grad_matmul(dy, w_up, z.contiguous(), scale, activation)
    dv = dy.new_empty(0)
    if need_dv:
        dv = kernels.residual_matmul(dy, dz, w_down, None, 1.0) if add_dy else torch.mm(dz, w_down)
    weights = bottleneck_weight_grads(dy, v, z, dz, activation, scale) if need_weights else no_grads(dy, 4)
    return dv, *weights


# Fake quantization (kernels/qat.py) -----------------------------------------------------------------------------
@register_kernel("fake_quantize_qparams", TRITON)
def fake_quantize_qparams(x, bits, group, symmetric, eps):
    scale, zero_point = _kernels("qat").qparams(x.contiguous(), group, *qat_format.qrange(bits), symmetric,
                                                qat_format.default_eps(x.dtype, eps))
    return scale.unsqueeze(1), zero_point.unsqueeze(1)


@register_kernel("fake_quantize", TRITON)
def fake_quantize(x, bits, group, symmetric, eps):
    return _kernels("qat").fake_quantize(x, group, *qat_format.qrange(bits), symmetric, eps)


@register_kernel("fake_quantize_backward", TRITON)
def fake_quantize_backward(grad, x, bits, group, symmetric, eps):
    return _kernels("qat").fake_quantize_backward(grad, x, group, *qat_format.qrange(bits), symmetric, eps)


@register_kernel("fake_quantize_with_scale", TRITON)
def fake_quantize_with_scale(x, scale, zero_point, bits, group):
    return _kernels("qat").fake_quantize_with_scale(x, scale, zero_point, group, *qat_format.qrange(bits))


@register_kernel("fake_quantize_with_scale_backward", TRITON)
def fake_quantize_with_scale_backward(grad, x, scale, zero_point, bits, group):
    return _kernels("qat").fake_quantize_with_scale_backward(grad, x, scale, zero_point, group, *qat_format.qrange(bits))


def _operands(x, weight, weight_bits, group, activation_bits, quantize_weight):
    x_range = qat_format.qrange(activation_bits) if activation_bits else None
    w_range = qat_format.qrange(weight_bits) if quantize_weight else None
    return _kernels("qat").FakeQuantOperands(x.contiguous(), weight.contiguous(), group, x_range, w_range,
                                             qat_format.default_eps(x.dtype, None))


@register_kernel("fake_quant_linear", TRITON)
def fake_quant_linear(x, weight, bias, weight_bits, group, activation_bits, quantize_weight):
    return _kernels("qat").fake_quant_matmul(
        _operands(x, weight, weight_bits, group, activation_bits, quantize_weight), bias)


@register_kernel("fake_quant_linear_backward", TRITON)
def fake_quant_linear_backward(dy, x, weight, weight_bits, group, activation_bits, quantize_weight, want_x,
                               want_weight):
    kernels = _kernels("qat")
    operands = _operands(x, weight, weight_bits, group, activation_bits, quantize_weight)
    return (kernels.fake_quant_matmul_grad_x(operands, dy) if want_x else None,
            kernels.fake_quant_matmul_grad_w(operands, dy) if want_weight else None)


# Distillation rows (kernels/distillation.py) ----------------------------------------------------------------------
def _full_vocabulary_fp32(zs, zt, beta, temperature, want_grad, topk, grad_scale) -> bool:
    return not topk and zs.dtype == torch.float32


@register_kernel("distill_soft_rows", TRITON, supports=_full_vocabulary_fp32, declines="teacher top-k, fp64")
def distill_soft_rows(zs, zt, beta, temperature, want_grad, topk, grad_scale):
    soft = _kernels("distillation").distill_soft_rows(zs, zt, temperature, beta, grad_scale, want_grad)
    return soft, (zs if want_grad else None)


# EWC penalty pass (kernels/ewc.py) --------------------------------------------------------------------------------
def _no_fp64(params, grads, fisher, anchor, lam) -> bool:
    return all(p.dtype != torch.float64 and f.dtype != torch.float64 for p, f in zip(params, fisher))


@register_kernel("ewc_penalty", TRITON, supports=_no_fp64, declines="fp64 parameters or storage")
def ewc_penalty(params, grads, fisher, anchor, lam):
    return _kernels("ewc").ewc_penalty(params, grads, fisher, anchor, lam)


# Log-probability rows (kernels/logprobs.py) ---------------------------------------------------------------------------
def _fp32_tile(z, labels, want_entropy, grad_logprob, grad_entropy) -> bool:
    return z.dtype == torch.float32


@register_kernel("logprob_rows", TRITON, supports=_fp32_tile, declines="fp64")
def logprob_rows(z, labels, want_entropy, grad_logprob, grad_entropy):
    return _kernels("logprobs").logprob_rows(z, labels, want_entropy, grad_logprob, grad_entropy)
