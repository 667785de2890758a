"""The decode path of patched peft LoRA layers: a forward for calls of a few rows (generation's decode steps,
M <= 16) that nothing records or traces (grad mode off, no torch.compile, no dispatch mode, plain tensors, no
autocast), where the cost of each call is the Python around a small GEMM rather than the GEMM.

It reads peft's state straight from the layer's dicts on every call (active adapters, lora_A / lora_B / dropout
modules, their parameters, scaling), so nothing is cached that peft could change behind it, and it computes

    out = base(x_rows)                                  dense nn.Linear: one F.linear; bitsandbytes 4-bit: the
                                                        fused NF4 kernel, its operands checked once per storage
    out += scale_g * (x_rows @ A_g^T) @ B_g^T (+ bias)  per active adapter: torch.mm + addmm_ into out in place

Same operations as the general path (fastft/integrations/peft.py) on a few rows: the input group's per-adapter
products for <= 16 rows, the up-projections accumulated by addmm_, so its results are those of that path. Whatever
it does not cover (a variant such as DoRA, dropout in training mode, mixed dtypes, adapters disabled or merged,
hooks on the base layer, a group round in progress) returns None and the general path runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastft.integrations import bnb
from fastft.ops import lora as lora_ops
from fastft.ops import nf4 as nf4_ops

FEW_ROWS = 16  # rows of x (tokens) up to which a call takes the decode path


def _traced_or_recorded(x: Tensor) -> bool:
    return (torch.is_grad_enabled() or type(x) is not torch.Tensor or torch.is_autocast_enabled(x.device.type)
            or torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0)


def _hooked(base: nn.Module) -> bool:
    module = nn.modules.module
    return bool(base._forward_hooks or base._forward_pre_hooks or module._global_forward_hooks
                or module._global_forward_pre_hooks)


def _adapter_terms(layer, dtype: torch.dtype) -> list[tuple] | None:
    """(lora_A, lora_B, scale, lora bias) of each active adapter (peft's order), or None where the decode path does
    not cover the layer's current state."""
    if layer._disable_adapters or layer.merged_adapters:
        return None
    active = layer._active_adapter
    modules = layer._modules
    lora_As, lora_Bs = modules["lora_A"]._modules, modules["lora_B"]._modules
    dropouts = modules["lora_dropout"]._modules
    variants = layer.__dict__.get("lora_variant") or ()
    group = layer.__dict__.get("_fastft_input_group")
    if group is not None and group.pending:  # a group round in progress: the general path completes it
        return None
    terms = []
    for name in (active,) if isinstance(active, str) else active:
        lora_A = lora_As.get(name)
        if lora_A is None:  # peft skips an active adapter this layer does not have
            continue
        lora_B, dropout = lora_Bs[name], dropouts[name]
        if name in variants or type(lora_A) is not nn.Linear or type(lora_B) is not nn.Linear:
            return None
        if layer.training and not (type(dropout) is nn.Identity or (type(dropout) is nn.Dropout and dropout.p == 0)):
            return None
        A, B, bias = lora_A._parameters["weight"], lora_B._parameters["weight"], lora_B._parameters.get("bias")
        if A.dtype != dtype or B.dtype != dtype or (bias is not None and bias.dtype != dtype):
            return None
        terms.append((A, B, float(layer.scaling[name]), bias))
    return terms


def _add_terms(out: Tensor, rows: Tensor, terms: list[tuple]) -> Tensor:
    for A, B, scale, bias in terms:
        lora_ops.add_lora_up(out, torch.mm(rows, A.t()), B, scale, bias)
    return out


def dense_forward(layer, x: Tensor) -> Tensor | None:
    """A patched peft lora.Linear on an nn.Linear base, for a few rows under no grad; None: not covered here."""
    if x.dim() < 2 or x.numel() > FEW_ROWS * x.shape[-1] or _traced_or_recorded(x):
        return None
    base = layer._modules["base_layer"]
    if type(base) is not nn.Linear or _hooked(base):
        return None
    weight, bias = base._parameters["weight"], base._parameters["bias"]
    if weight.dtype != x.dtype or (bias is not None and bias.dtype != x.dtype):
        return None
    terms = _adapter_terms(layer, x.dtype)
    if terms is None:
        return None
    rows = x.reshape(-1, x.shape[-1])
    out = _add_terms(F.linear(rows, weight, bias), rows, terms)
    return out.view(*x.shape[:-1], out.shape[-1])


def linear4bit_forward(layer, x: Tensor) -> Tensor | None:
    """A patched peft lora.Linear4bit on a bitsandbytes Linear4bit base, for a few rows under no grad, x in the base's
    compute dtype; None: not covered here."""
    if x.dim() < 2 or x.numel() > FEW_ROWS * x.shape[-1] or _traced_or_recorded(x):
        return None
    base = layer._modules["base_layer"]
    if not base.compute_type_is_set or base.compute_dtype not in (None, x.dtype):
        return None
    bias = base._parameters.get("bias")
    if bias is not None and bias.dtype != x.dtype:
        return None
    terms = _adapter_terms(layer, x.dtype)
    if terms is None:
        return None
    packed, state = bnb.checked_operands(base)
    if packed.device != x.device or x.shape[-1] != state.shape[1]:
        return None
    rows = x.reshape(-1, x.shape[-1])
    out = nf4_ops.nf4_linear(rows, packed, *state.op_args(), state.shape[0], bias)
    out = _add_terms(out, rows, terms)
    return out.view(*x.shape[:-1], out.shape[-1])
