"""Bottleneck adapters for transformers models (the recipe: fastft/methods/adapters.py)."""

from fastft.methods.adapters import (
    PLACEMENTS,
    AdapterConfig,
    active_adapters,
    adapter_state_dict,
    add_adapters,
    load_adapter,
    remove_adapters,
    save_adapter,
    set_active,
)
from fastft.nn.bottleneck import BottleneckAdapter

__all__ = ["PLACEMENTS", "AdapterConfig", "BottleneckAdapter", "active_adapters", "adapter_state_dict",
           "add_adapters", "load_adapter", "remove_adapters", "save_adapter", "set_active"]
