"""Helpers the recipes share: which modules a name list selects, replacing a submodule by name, checking a number
option."""

from __future__ import annotations

import math

from torch import nn


def name_matches(name: str, names: tuple[str, ...]) -> bool:
    """Whether the module called `name` (dotted) is one of `names`: a full name, a dotted suffix or one component."""
    parts = name.split(".")
    return any(name == s or name.endswith("." + s) or s in parts for s in names)


def as_names(names) -> tuple[str, ...]:
    """A tuple of module names from one name or an iterable of them."""
    return (names,) if isinstance(names, str) else tuple(names)


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where `model`'s submodule `name` is."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def check_number(name: str, value, allow_zero: bool = False) -> None:
    """A ValueError naming `name` unless `value` is a finite real number > 0 (>= 0 with allow_zero)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be a finite number {'>=' if allow_zero else '>'} 0, got {value!r}")
