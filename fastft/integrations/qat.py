"""Quantization-aware fine-tuning of transformers models: `prepare` swaps linear layers for FakeQuantLinear,
`convert` turns those into QuantizedLinear (real int weights), whose outputs equal the fake-quantized model's."""

from __future__ import annotations

from typing import Optional

from torch import nn

from fastft.integrations.transformers import _skipped
from fastft.nn.fake_quant_linear import FakeQuantLinear, QuantizedLinear


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def prepare(model: nn.Module, weight_bits: int = 4, group_size: int = 32, activation_bits: Optional[int] = None,
            skip=("lm_head",)) -> dict[str, str]:
    """Swap every `nn.Linear` of `model` (in place, sharing its parameters) for a FakeQuantLinear, except modules
    named in `skip` (a name or its last component). Returns {module name: why it was left as it is} for the
    linears not swapped (skipped, or in_features not a multiple of group_size)."""
    left = {}
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear:
            continue
        if _skipped(name, skip):
            left[name] = "skipped"
        elif module.in_features % group_size:
            left[name] = f"in_features {module.in_features} is not a multiple of group_size {group_size}"
        else:
            _replace(model, name, FakeQuantLinear.from_linear(module, weight_bits, group_size, activation_bits))
    return left


def convert(model: nn.Module) -> int:
    """Replace every FakeQuantLinear by a QuantizedLinear holding its integer weight codes and fp32 scales (in
    place). Returns how many layers were converted."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuantLinear)]
    for name, module in targets:
        _replace(model, name, QuantizedLinear.from_fake_quant(module))
    return len(targets)
