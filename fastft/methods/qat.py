"""Quantization-aware fine-tuning: `prepare` swaps a model's linear layers for FakeQuantLinear, `convert` turns those
into QuantizedLinear (real int weights), whose outputs equal the fake-quantized model's."""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastft.methods.common import as_names, name_matches, replace_module
from fastft.nn.fake_quant_linear import FakeQuantLinear, QuantizedLinear


def prepare(model: nn.Module, weight_bits: int = 4, group_size: int = 32, activation_bits: Optional[int] = None,
            skip=("lm_head",), learn_scales: bool = False) -> dict[str, str]:
    """Swap every `nn.Linear` of `model` (in place, sharing its parameters) for a FakeQuantLinear, except modules
    named in `skip` (a name or its last component); learn_scales adds learned per-group weight scales. Returns
    {module name: why it was left as it is} for the linears not swapped (skipped, or in_features not a multiple
    of group_size)."""
    left = {}
    skip = as_names(skip)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if name_matches(name, skip):
            left[name] = "skipped"
        elif module.in_features % group_size:
            left[name] = f"in_features {module.in_features} is not a multiple of group_size {group_size}"
        else:
            replace_module(model, name, FakeQuantLinear.from_linear(module, weight_bits, group_size, activation_bits,
                                                                    learn_scales))
    return left


def convert(model: nn.Module) -> int:
    """Replace every FakeQuantLinear by a QuantizedLinear holding its integer weight codes and fp32 scales (in
    place). Returns how many layers were converted."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name, module in targets:
        replace_module(model, name, QuantizedLinear.from_fake_quant(module))
    return len(targets)
