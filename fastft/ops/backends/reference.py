"""The "reference" backend: plain torch, from the specification in fastft/reference/. It implements every entry of
the routing table and runs wherever no other backend does (devices without kernels, FASTFT_BACKEND=reference) or
where the chosen backend declines the inputs (its `supports` predicate). Composite ops (fake_quant_linear) are
written here in terms of other fastft ops, which route on their own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft.ops import qat as qat_ops
from fastft.ops.routing import register_kernel
from fastft.reference import bottleneck as bottleneck_ref
from fastft.reference import distillation as distillation_ref
from fastft.reference import ewc as ewc_ref
from fastft.reference import grad_reverse as grad_reverse_ref
from fastft.reference import logprobs as logprobs_ref
from fastft.reference import lora as lora_ref
from fastft.reference import nf4 as nf4_ref
from fastft.reference import qat as qat_ref
from fastft.reference import routed_lora as routed_lora_ref

REFERENCE = "reference"


# 4-bit weights --------------------------------------------------------------------------------------------------
@register_kernel("nf4_quantize", REFERENCE)
def nf4_quantize(weight, blocksize, quant_type):
    return nf4_ref.quantize_4bit_ref(weight, blocksize, quant_type)


def _dense(packed, absmax, code, blocksize, nested_absmax, nested_code, nested_blocksize, nested_offset, shape,
           dtype):
    if nested_absmax is not None:
        absmax = nf4_ref.nested_absmax_ref(absmax, nested_absmax, nested_code, nested_offset, nested_blocksize)
    return nf4_ref.dequantize_4bit_ref(packed, absmax, code, blocksize, shape, dtype)


@register_kernel("nf4_dequantize", REFERENCE)
def nf4_dequantize(*weight_shape_dtype):
    return _dense(*weight_shape_dtype)


@register_kernel("nf4_dequantize_into", REFERENCE)
def nf4_dequantize_into(out, *weight):
    out.copy_(_dense(*weight, list(out.shape), out.dtype))


@register_kernel("nf4_linear", REFERENCE)
def nf4_linear(rows, *weight_out_features_bias):
    *weight, out_features, bias = weight_out_features_bias
    return nf4_ref.nf4_linear_ref(rows, _dense(*weight, [out_features, rows.shape[-1]], rows.dtype), bias)


@register_kernel("nf4_linear_grad_input", REFERENCE)
def nf4_linear_grad_input(rows, *weight_in_features):
    *weight, in_features = weight_in_features
    return rows @ _dense(*weight, [rows.shape[-1], in_features], rows.dtype)


# LoRA -----------------------------------------------------------------------------------------------------------
@register_kernel("lora_dropout", REFERENCE)
def lora_dropout(x, p, seed):
    return lora_ref.lora_dropout_ref(x, p, seed)


def _dropped(x, dtype, p, seed):
    rows = x.reshape(-1, x.shape[-1]).to(dtype)
    return lora_ref.lora_dropout_ref(rows.contiguous(), p, seed) if p > 0 else rows


@register_kernel("lora_down", REFERENCE)
def lora_down(rows, A_cat, ranks, p, seeds):
    if p == 0:
        return _dropped(rows, A_cat.dtype, 0.0, 0) @ A_cat.t()
    parts = A_cat.split(ranks)
    return torch.cat([_dropped(rows, A_cat.dtype, p, seed) @ A.t() for A, seed in zip(parts, seeds)], dim=1)


@register_kernel("lora_down_backward", REFERENCE)
def lora_down_backward(du, x, A_cat, ranks, p, seeds, want_x, want_A):
    grad_x = grad_A = None
    if want_x:
        if p == 0:
            grad_x = (du @ A_cat).to(x.dtype)
        else:
            for d, A, seed in zip(du.split(ranks, dim=1), A_cat.split(ranks), seeds):
                term = _dropped(d @ A, A.dtype, p, seed)
                grad_x = term if grad_x is None else grad_x.add_(term)
            grad_x = grad_x.to(x.dtype)
    if want_A:
        if p == 0:
            grad_A = du.t() @ _dropped(x, du.dtype, 0.0, 0)
        else:
            grad_A = torch.cat([d.t() @ _dropped(x, du.dtype, p, seed)
                                for d, seed in zip(du.split(ranks, dim=1), seeds)])
    return grad_x, grad_A


# Bottleneck adapters --------------------------------------------------------------------------------------------
@register_kernel("bottleneck_adapter", REFERENCE)
def bottleneck_adapter(v, base, w_down, b_down, w_up, b_up, activation, scale):
    z = F.linear(v, w_down, b_down)
    a = bottleneck_ref.activate(z, activation)
    return base + (F.linear(a, w_up, b_up) * scale).to(base.dtype), z


def no_grads(t, count: int) -> tuple:
    """Distinct empty tensors for the gradients not asked for (op outputs must not alias each other)."""
    return tuple(t.new_empty(0) for _ in range(count))


def bottleneck_weight_grads(dy, v, z, dz, activation, scale):
    """(dW_down, db_down, dW_up, db_up) from the output gradient dy (tokens, hidden), the down-projection's input v
    and pre-activation z, and dz = act'(z) * scale * (dy W_up); bias sums accumulate in fp32 at least."""
    accumulate = torch.promote_types(dy.dtype, torch.float32)
    grad_w_up = torch.mm(dy.t(), bottleneck_ref.activate(z, activation)).mul_(scale)
    grad_b_up = dy.sum(0, dtype=accumulate).mul_(scale).to(dy.dtype)
    grad_b_down = dz.sum(0, dtype=accumulate).to(dz.dtype)
    return torch.mm(dz.t(), v), grad_b_down, grad_w_up, grad_b_up


@register_kernel("bottleneck_backward", REFERENCE)
def bottleneck_backward(dy, v, z, w_down, w_up, activation, scale, add_dy, need_dv, need_weights):
    dz = bottleneck_ref.activation_grad(torch.mm(dy, w_up).mul_(scale), z, activation)
    dv = (torch.addmm(dy, dz, w_down) if add_dy else torch.mm(dz, w_down)) if need_dv else dy.new_empty(0)
    weights = bottleneck_weight_grads(dy, v, z, dz, activation, scale) if need_weights else no_grads(dy, 4)
    return dv, *weights


# Fake quantization ----------------------------------------------------------------------------------------------
@register_kernel("fake_quantize_qparams", REFERENCE)
def fake_quantize_qparams(x, bits, group, symmetric, eps):
    return qat_ref.qparams_ref(x, bits, group, symmetric, eps)


@register_kernel("fake_quantize", REFERENCE)
def fake_quantize(x, bits, group, symmetric, eps):
    with torch.no_grad():
        return qat_ref.fake_quantize_groups_ref(x, bits, group, symmetric, eps)


@register_kernel("fake_quantize_backward", REFERENCE)
def fake_quantize_backward(grad, x, bits, group, symmetric, eps):
    qmin, qmax = qat_ref.qrange(bits)
    scale, zero_point = qat_ref.qparams_ref(x, bits, group, symmetric, eps)
    inv = 1.0 / scale
    pre = torch.round(x.reshape(-1, group) * inv) + zero_point
    passed = torch.where((pre >= qmin) & (pre <= qmax), (grad.reshape(-1, group) * scale).to(x.dtype), 0.0)
    # masked, then times 1 / scale, as torchao's autograd: a NaN scale makes every gradient of its group NaN
    return (passed * inv).reshape(x.shape).to(x.dtype)


@register_kernel("fake_quantize_with_scale", REFERENCE)
def fake_quantize_with_scale(x, scale, zero_point, bits, group):
    with torch.no_grad():
        return qat_ref.fake_quantize_with_scale_ref(x, scale, bits, group, zero_point)


@register_kernel("fake_quantize_with_scale_backward", REFERENCE)
def fake_quantize_with_scale_backward(grad, x, scale, zero_point, bits, group):
    """As torchao's autograd: with p = x_dtype(dy * s) and p_in = p inside the range (0 at the clamp),
    dx = p_in * (1 / s), ds = sum over the group of dy * (x_dtype(q) - x_dtype(zp)) - (1 / s)^2 * sum of p_in * x,
    and d(zp) = sum of p_in - x_dtype(sum of p) (zp enters q in fp32 and the dequantization in x's dtype)."""
    qmin, qmax = qat_ref.qrange(bits)
    groups = x.reshape(-1, group)
    s = scale.reshape(-1, 1)
    inv = 1.0 / s
    zp = zero_point.reshape(-1, 1) if zero_point is not None else torch.zeros_like(s)
    pre = torch.round(groups * inv) + zp
    dy = grad.reshape(-1, group)
    p = (dy * s).to(x.dtype)
    passed = torch.where((pre >= qmin) & (pre <= qmax), p.to(torch.float32), 0.0)
    dequantized = torch.clamp(pre, qmin, qmax).to(x.dtype) - zp.to(x.dtype)
    direct = (dy.to(torch.float32) * dequantized).sum(-1, keepdim=True)
    via_inverse = (passed * groups).sum(-1, keepdim=True) * (-(inv * inv))
    grad_scale = (direct + via_inverse).reshape(scale.shape).to(scale.dtype)
    grad_zero_point = scale.new_empty(0)
    if zero_point is not None:
        grad_zero_point = (passed.sum(-1, keepdim=True) - p.sum(-1, keepdim=True).to(torch.float32))
        grad_zero_point = grad_zero_point.reshape(zero_point.shape)
    return (passed * inv).to(x.dtype).reshape(x.shape), grad_scale, grad_zero_point


@register_kernel("fake_quant_linear", REFERENCE)
def fake_quant_linear(x, weight, bias, weight_bits, group, activation_bits, quantize_weight):
    weight_q = qat_ops.quantized_weight(weight, weight_bits, group, quantize_weight)
    return F.linear(qat_ops.quantized_input(x, activation_bits), weight_q, bias)


@register_kernel("fake_quant_linear_backward", REFERENCE)
def fake_quant_linear_backward(dy, x, weight, weight_bits, group, activation_bits, quantize_weight, want_x,
                               want_weight):
    """Each fake-quantized operand recomputed (one fastft::fake_quantize pass) only for the gradient that needs it,
    then ATen GEMMs and the straight-through passes (fastft::fake_quantize_backward)."""
    grad_x = grad_weight = None
    eps = qat_ref.default_eps(x.dtype, None)
    if want_x:
        grad_x = dy @ qat_ops.quantized_weight(weight, weight_bits, group, quantize_weight)
        if activation_bits:
            grad_x = qat_ops.fake_quantize_backward(grad_x, x, activation_bits, x.shape[1], False, eps)
    if want_weight:
        grad_weight = dy.t() @ qat_ops.quantized_input(x, activation_bits)
        if quantize_weight:
            grad_weight = qat_ops.fake_quantize_backward(grad_weight, weight, weight_bits, group, True, eps)
    return grad_x, grad_weight


# Distillation rows ----------------------------------------------------------------------------------------------
@register_kernel("distill_soft_rows", REFERENCE)
def distill_soft_rows(zs, zt, beta, temperature, want_grad, topk, grad_scale):
    return distillation_ref.soft_rows_ref(zs, zt, beta, temperature, want_grad, topk, grad_scale)


# EWC penalty pass -----------------------------------------------------------------------------------------------
@register_kernel("ewc_penalty", REFERENCE)
def ewc_penalty(params, grads, fisher, anchor, lam):
    return ewc_ref.ewc_penalty_ref(params, grads, fisher, anchor, lam)


# Gradient reversal (plain torch on every device: a copy and a scaled copy) ---------------------------------------
@register_kernel("grad_reverse", REFERENCE)
def grad_reverse(x):
    return grad_reverse_ref.grad_reverse_ref(x)


@register_kernel("grad_reverse_backward", REFERENCE)
def grad_reverse_backward(grad, lam):
    return grad_reverse_ref.grad_reverse_backward_ref(grad, lam)


# Per-sample routed LoRA (plain torch: rows grouped by adapter, ATen GEMMs per group) ----------------------------
@register_kernel("routed_lora", REFERENCE)
def routed_lora(x, lora_As, lora_Bs, scales, route):
    return routed_lora_ref.routed_lora_ref(x, lora_As, lora_Bs, scales, route)


@register_kernel("routed_lora_backward", REFERENCE)
def routed_lora_backward(dy, x, lora_As, lora_Bs, scales, route, want_x):
    return routed_lora_ref.routed_lora_backward_ref(dy, x, lora_As, lora_Bs, scales, route, want_x)


# Log-probability rows -------------------------------------------------------------------------------------------
@register_kernel("logprob_rows", REFERENCE)
def logprob_rows(z, labels, want_entropy, grad_logprob, grad_entropy):
    return logprobs_ref.logprob_rows_ref(z, labels, want_entropy, grad_logprob, grad_entropy)
