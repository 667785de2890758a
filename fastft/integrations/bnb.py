"""bitsandbytes interop: run a bitsandbytes `Linear4bit` through fastft's fused NF4 matmul on its own storage (no
dequantized copy), and replace plain `Linear4bit` layers by NF4Linear sharing their storage (both for
`fastft.patch`)."""

from __future__ import annotations

import threading

import torch
from torch import nn

from fastft import nf4
from fastft.nn import NF4Linear
from fastft.nn.nf4_linear import nf4_linear_forward


class _StorageView:
    """fastft's view of one bitsandbytes 4-bit weight: the NF4State it reads, the bitsandbytes QuantState and absmax
    tensor it was built from (bitsandbytes replaces the absmax whenever it changes the weight's layout, keeping the
    QuantState object), and bitsandbytes' standard-layout statistics at that time, to put back exactly after a
    CPU repack (which rounds every block scale to bf16, and whose inverse quantizes them again)."""

    def __init__(self, quant_state):
        self.quant_state, self.absmax = quant_state, quant_state.absmax
        self.statistics = (quant_state.absmax, quant_state.offset if quant_state.nested else None,
                           quant_state.state2 if quant_state.nested else None, quant_state.nested)
        self.state = nf4.NF4State.from_bnb(quant_state)
        self.checked: tuple | None = None  # the codes' (address, size, dtype, device, contiguity) last validated

    def matches(self, quant_state) -> bool:
        return (self.quant_state is quant_state and self.absmax is quant_state.absmax
                and not getattr(quant_state, "packing_format_for_cpu", False))

    def repacks_to(self, repacked_absmax: torch.Tensor) -> bool:
        """Whether bitsandbytes' CPU repack of these statistics gives `repacked_absmax` (its bf16 (blocks per row,
        rows) layout) exactly: then they are the standard-layout statistics of that repacked weight."""
        from bitsandbytes.functional import dequantize_blockwise

        absmax, offset, state2, nested = self.statistics
        rows, cols = self.state.shape
        if repacked_absmax.shape != (cols // self.state.blocksize, rows):
            return False
        if nested:  # as the repack computes it
            absmax = (dequantize_blockwise(absmax, state2) + offset).float()
        return torch.equal(absmax.reshape(rows, -1).t().to(torch.bfloat16), repacked_absmax)

    def restore(self, quant_state) -> None:
        """Put these statistics back into `quant_state` (its codes already in the standard layout)."""
        absmax, offset, state2, nested = self.statistics
        quant_state.absmax, quant_state.nested = absmax, nested
        if nested:
            quant_state.offset, quant_state.state2 = offset, state2


_CONVERSION = threading.Lock()  # a layout conversion replaces the weight's tensors: one thread at a time


def nf4_state(base: nn.Module) -> nf4.NF4State:
    """The NF4State of a bitsandbytes Linear4bit's weight in its current storage, kept outside the module's
    parameters and buffers and rebuilt whenever bitsandbytes changed that storage (a new QuantState, or a new
    absmax in the same one: bitsandbytes changes a weight's layout in place). Building it reads the double-quant
    offset (a host sync on GPU): once per storage.

    bitsandbytes >= 0.50 repacks a weight for its own CPU kernel in eval-mode forwards without gradient on
    AVX512_BF16 CPUs (`quant_state.packing_format_for_cpu`: codes re-laid in tiles, absmax transposed and rounded
    to bf16, double quant dropped). Such a weight is converted back to the standard layout first, in place, with
    bitsandbytes' own inverse for the codes; its statistics become the ones fastft read before the repack when
    they repack to exactly that bf16 absmax (so train / eval / generate cycles lose nothing), else those of
    bitsandbytes' inverse (the bf16 block scales, quantized again with double quant), as its `state_dict` saves.
    """
    if getattr(base.weight, "quant_state", None) is None:  # FSDP's unsharded parameter: restored from the module
        from bitsandbytes.nn.modules import fix_4bit_weight_quant_state_from_module

        fix_4bit_weight_quant_state_from_module(base)
    view = base.__dict__.get("_fastft_nf4_view")
    if view is not None and view.matches(base.weight.quant_state):
        return view.state
    with _CONVERSION:
        view = base.__dict__.get("_fastft_nf4_view")
        if view is None or not view.matches(base.weight.quant_state):
            _standard_layout(base.weight, view)
            view = _StorageView(base.weight.quant_state)
            base.__dict__["_fastft_nf4_view"] = view
    return view.state


def _standard_layout(weight, previous: _StorageView | None) -> None:
    """Convert a bitsandbytes weight repacked for its CPU kernel back to the standard layout, in place (see
    `nf4_state`); `previous`: fastft's view of it before, whose statistics are put back when they match."""
    quant_state = weight.quant_state
    repacked = getattr(quant_state, "packing_format_for_cpu", False) or (not quant_state.nested
                                                                         and quant_state.absmax.dim() == 2)
    repacked_absmax = quant_state.absmax
    nf4.NF4State.from_bnb_weight(weight)  # bitsandbytes' inverse, in place
    if repacked and previous is not None and previous.repacks_to(repacked_absmax):
        previous.restore(weight.quant_state)


def linear4bit_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit.forward with the fused NF4 matmul on its own storage (no dequantized copy)."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    state = nf4_state(base)  # first: it may convert base.weight back to the standard layout
    return nf4_linear_forward(x, nf4.packed_bytes(base.weight.data), state, base.bias, base.compute_dtype)


def checked_operands(base: nn.Module) -> tuple[torch.Tensor, nf4.NF4State]:
    """(packed codes, NF4State) of a bitsandbytes Linear4bit's weight for the fused kernel, validated
    (`NF4State.validate`) once per storage: again whenever the state or the codes' memory changed."""
    state = nf4_state(base)
    packed = nf4.packed_bytes(base.weight.data)
    view = base.__dict__["_fastft_nf4_view"]
    key = (packed.data_ptr(), packed.numel(), packed.dtype, packed.device, packed.is_contiguous())
    if view.checked != key:
        state.validate(packed)
        view.checked = key
    return packed, state


def keep_standard_layout(base: nn.Module) -> None:
    """Convert a bitsandbytes Linear4bit's weight back to the standard layout if bitsandbytes repacked it for its
    CPU kernel, and keep its own forward (still run by unfused calls, e.g. with adapters disabled) from repacking
    it again: the fused path reads the standard layout, and converting back and forth would cost a pass over the
    weight each time. `restore_layout_setting` gives bitsandbytes its
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
            state = nf4_state(layer)  # first: it may convert the weight back to the standard layout
            fused = NF4Linear.from_packed(nf4.packed_bytes(layer.weight.data), state, layer.bias, layer.compute_dtype)
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
