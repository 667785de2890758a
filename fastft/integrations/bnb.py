"""bitsandbytes interop: run a bitsandbytes `Linear4bit` through fastft's fused NF4 matmul on its own storage (no
dequantized copy), and replace plain `Linear4bit` layers by NF4Linear sharing their storage (both for
`fastft.patch`)."""

from __future__ import annotations

import torch
from torch import nn

from fastft import nf4
from fastft.nn import NF4Linear
from fastft.nn.nf4_linear import nf4_linear_forward


def nf4_state(base: nn.Module) -> nf4.NF4State:
    """The NF4State view of a bitsandbytes layer's QuantState, built once per QuantState (reading the
    double-quant offset is a host sync on GPU) and kept outside the module's parameters and buffers. A weight that
    bitsandbytes repacked for its CPU kernel (its own forward does so in eval mode without gradients on
    AVX512_BF16 CPUs, e.g. when an unfused call ran) is converted back to its standard layout first."""
    if getattr(base.weight, "quant_state", None) is None:  # FSDP's unsharded parameter: restored from the module
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
    quant_state = base.weight.quant_state
    cached = base.__dict__.get("_fastft_nf4_state")
    if cached is None or cached[0] is not quant_state or getattr(quant_state, "packing_format_for_cpu", False):
        _, state = nf4.NF4State.from_bnb_weight(base.weight)
        cached = (base.weight.quant_state, state)
        base.__dict__["_fastft_nf4_state"] = cached
    return cached[1]


def linear4bit_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit.forward with the fused NF4 matmul on its own storage (no dequantized copy)."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    state = nf4_state(base)  # first: it may convert base.weight back to the standard layout
    return nf4_linear_forward(x, nf4.packed_bytes(base.weight.data), state, base.bias, base.compute_dtype)


def keep_standard_layout(base: nn.Module) -> None:
    """Convert a bitsandbytes Linear4bit's weight back to the standard layout if bitsandbytes repacked it for its
    CPU kernel, and keep its own forward (still run by unfused calls, e.g. with adapters disabled) from repacking
    it again: the fused path reads the standard layout, and converting back and forth would cost a pass over the
    weight each time (and requantize double-quant statistics). `restore_layout_setting` gives bitsandbytes its
    setting back."""
    nf4_state(base)
    if "support_avx512bf16_for_cpu" in base.__dict__ and "_fastft_bnb_cpu_repack" not in base.__dict__:
        base.__dict__["_fastft_bnb_cpu_repack"] = base.support_avx512bf16_for_cpu
        base.support_avx512bf16_for_cpu = False


def restore_layout_setting(module: nn.Module) -> None:
    """Undo `keep_standard_layout`'s change of bitsandbytes' CPU repack setting (no-op for other modules)."""
    if "_fastft_bnb_cpu_repack" in module.__dict__:
        module.support_avx512bf16_for_cpu = module.__dict__.pop("_fastft_bnb_cpu_repack")


def _plain_linear4bit_layers(model: nn.Module, wrapper_types: tuple):
    """(parent, child name, full name, module) of bitsandbytes Linear4bit layers not inside a `wrapper_types`
    module (peft's LoRA layers, which run their base themselves)."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is bnb.nn.Linear4bit and not isinstance(module, wrapper_types):
                yield module, child_name, f"{name}.{child_name}" if name else child_name, child


def replace_linear4bit(model: nn.Module, report, wrapper_types: tuple = ()) -> None:
    """Replace plain bitsandbytes Linear4bit layers by NF4Linear layers sharing their storage (the original is kept
    aside for `restore_linear4bit`), recording each in `report` (a PatchReport)."""
    for parent, child_name, full_name, layer in list(_plain_linear4bit_layers(model, wrapper_types)):
        try:
            fused = NF4Linear.from_bnb(layer)
        except (TypeError, ValueError) as error:
            report.unfused[full_name] = str(error)
            continue
        fused.__dict__["_fastft_replaced"] = layer  # not a submodule: keeps state_dict keys unchanged
        setattr(parent, child_name, fused)
        report.fused["bnb.Linear4bit -> NF4Linear"] += 1


def restore_linear4bit(model: nn.Module) -> int:
    """Put back the layers `replace_linear4bit` replaced; returns how many."""
    restored = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            replaced = child.__dict__.get("_fastft_replaced")
            if replaced is not None:
                setattr(module, child_name, replaced)
                restored += 1
    return restored
