"""The "native" backend: fastft's C++ CPU kernels (the extension fastft._C, built from csrc/), each binding named
after its op."""

from __future__ import annotations

import torch

from fastft.formats import nf4 as nf4_format
from fastft.formats import qat as qat_format
from fastft.ops.backend import native_extension
from fastft.ops.routing import register_kernel

NATIVE = "native"


def _all_fp32(*tensors) -> bool:
    return all(t is None or t.dtype == torch.float32 for t in tensors)


# 4-bit weights (csrc/nf4_quantize.cpp, nf4_dequantize.cpp, nf4_linear.cpp) --------------------------------------------
@register_kernel("nf4_quantize", NATIVE)
def nf4_quantize(weight, blocksize, quant_type):
    midpoints, order = nf4_format.quantize_tables(quant_type)
    return native_extension().nf4_quantize(weight.contiguous(), blocksize, midpoints, order)


@register_kernel("nf4_dequantize", NATIVE)
def nf4_dequantize(*weight_shape_dtype):
    *weight, shape, dtype = weight_shape_dtype
    return native_extension().nf4_dequantize(*weight, list(shape), dtype, None)


@register_kernel("nf4_dequantize_into", NATIVE)
def nf4_dequantize_into(out, *weight):
    native_extension().nf4_dequantize(*weight, list(out.shape), out.dtype, out)


@register_kernel("nf4_linear", NATIVE)
def nf4_linear(rows, *weight_out_features_bias):
    return native_extension().nf4_linear(rows, *weight_out_features_bias)


@register_kernel("nf4_linear_grad_input", NATIVE)
def nf4_linear_grad_input(rows, *weight_in_features):
    return native_extension().nf4_linear_grad_input(rows, *weight_in_features)


# LoRA (csrc/lora.cpp) -------------------------------------------------------------------------------------------------
@register_kernel("lora_dropout", NATIVE)
def lora_dropout(x, p, seed):
    return native_extension().lora_dropout(x, p, seed)


def _with_dropout(*args) -> bool:
    return args[3] > 0


@register_kernel("lora_down", NATIVE, supports=_with_dropout, declines="dropout 0 (one ATen GEMM)")
def lora_down(rows, A_cat, ranks, p, seeds):
    return native_extension().lora_down(rows, A_cat, ranks, p, seeds)


@register_kernel("lora_down_backward", NATIVE, supports=lambda du, x, A_cat, ranks, p, *_: p > 0,
                 declines="dropout 0 (one ATen GEMM each)")
def lora_down_backward(du, x, A_cat, ranks, p, seeds, want_x, want_A):
    return tuple(native_extension().lora_down_backward(du, x, A_cat, ranks, p, seeds, want_x, want_A))


# Per-sample routed LoRA (csrc/routed_lora.cpp) ---------------------------------------------------------------------------
@register_kernel("routed_lora", NATIVE)
def routed_lora(x, lora_As, lora_Bs, scales, route):
    return native_extension().routed_lora(x, list(lora_As), list(lora_Bs), list(scales), route)


@register_kernel("routed_lora_backward", NATIVE)
def routed_lora_backward(dy, x, lora_As, lora_Bs, scales, route, want_x):
    return tuple(native_extension().routed_lora_backward(dy, x, list(lora_As), list(lora_Bs), list(scales), route,
                                                         want_x))


# Bottleneck adapters (csrc/bottleneck.cpp) ----------------------------------------------------------------------------
# Mirrors kMaxRank and kMinTokens of csrc/bottleneck.cpp: narrower bottlenecks over at least this many tokens are
# faster in the C++ kernels; others run ATen's GEMMs (as fast there).
MAX_BOTTLENECK = 64
MIN_TOKENS = 1024


def _bottleneck_forward_fits(v, base, w_down, b_down, w_up, b_up, activation, scale) -> bool:
    return (_all_fp32(v, base, w_down, b_down, w_up, b_up) and w_down.shape[0] <= MAX_BOTTLENECK
            and v.shape[0] >= MIN_TOKENS)


@register_kernel("bottleneck_adapter", NATIVE, supports=_bottleneck_forward_fits,
                 declines=f"inputs other than fp32, bottlenecks over {MAX_BOTTLENECK}, under {MIN_TOKENS} tokens")
def bottleneck_adapter(v, base, w_down, b_down, w_up, b_up, activation, scale):
    return native_extension().bottleneck_adapter(v, base, w_down, b_down, w_up, b_up, activation, scale)


def _bottleneck_backward_fits(dy, v, z, w_down, w_up, *_) -> bool:
    return _all_fp32(dy, v, z, w_down, w_up) and z.shape[1] <= MAX_BOTTLENECK and dy.shape[0] >= MIN_TOKENS


@register_kernel("bottleneck_backward", NATIVE, supports=_bottleneck_backward_fits,
                 declines=f"inputs other than fp32, bottlenecks over {MAX_BOTTLENECK}, under {MIN_TOKENS} tokens")
def bottleneck_backward(dy, v, z, w_down, w_up, activation, scale, add_dy, need_dv, need_weights):
    return tuple(native_extension().bottleneck_backward(dy, v, z, w_down, w_up, activation, scale, add_dy, need_dv,
                                                        need_weights))


# Fake quantization (csrc/qat.cpp) -------------------------------------------------------------------------------------
@register_kernel("fake_quantize", NATIVE)
def fake_quantize(x, bits, group, symmetric, eps):
    qmin, qmax = qat_format.qrange(bits)
    return native_extension().fake_quantize(x, group, qmin, qmax, symmetric, eps).reshape(x.shape)


@register_kernel("fake_quantize_backward", NATIVE)
def fake_quantize_backward(grad, x, bits, group, symmetric, eps):
    qmin, qmax = qat_format.qrange(bits)
    return native_extension().fake_quantize_backward(grad.to(x.dtype), x, group, qmin, qmax, symmetric,
                                                     eps).reshape(x.shape)


@register_kernel("fake_quantize_with_scale", NATIVE)
def fake_quantize_with_scale(x, scale, zero_point, bits, group):
    qmin, qmax = qat_format.qrange(bits)
    return native_extension().fake_quantize_with_scale(x, scale, zero_point, group, qmin, qmax).reshape(x.shape)


@register_kernel("fake_quantize_with_scale_backward", NATIVE)
def fake_quantize_with_scale_backward(grad, x, scale, zero_point, bits, group):
    qmin, qmax = qat_format.qrange(bits)
    return native_extension().fake_quantize_with_scale_backward(grad.to(x.dtype), x, scale, zero_point, group, qmin,
                                                            qmax)


# Distillation rows (csrc/distillation.cpp) ----------------------------------------------------------------------------
def _full_vocabulary_fp32(zs, zt, beta, temperature, want_grad, topk, grad_scale) -> bool:
    return not topk and zs.dtype == torch.float32


@register_kernel("distill_soft_rows", NATIVE, supports=_full_vocabulary_fp32, declines="teacher top-k, fp64")
def distill_soft_rows(zs, zt, beta, temperature, want_grad, topk, grad_scale):
    soft = native_extension().distill_soft_rows(zs, zt, temperature, beta, grad_scale)
    return soft, (zs if want_grad else None)


# EWC penalty pass (csrc/ewc.cpp) --------------------------------------------------------------------------------------
@register_kernel("ewc_penalty", NATIVE)
def ewc_penalty(params, grads, fisher, anchor, lam):
    return native_extension().ewc_penalty(params, grads, fisher, anchor, lam)


# Log-probability rows (csrc/logprobs.cpp) -----------------------------------------------------------------------------
def _fp32_tile(z, labels, want_entropy, grad_logprob, grad_entropy) -> bool:
    return z.dtype == torch.float32


@register_kernel("logprob_rows", NATIVE, supports=_fp32_tile, declines="fp64")
def logprob_rows(z, labels, want_entropy, grad_logprob, grad_entropy):
    logprob, entropy, top = native_extension().logprob_rows(z, labels, want_entropy, grad_logprob, grad_entropy)
    return logprob, (entropy if want_entropy else None), top
