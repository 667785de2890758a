"""The mechanism of `fastft.patch`: a module instance's class becomes a cached subclass whose forward is fastft's.
No parameter, buffer or state_dict key changes, other instances of the class are untouched, and `restore_classes`
(used by `fastft.unpatch`) gives every swapped instance its original class back."""

from __future__ import annotations

import functools

from torch import nn

_SUBCLASSES: dict[tuple[type, object], type] = {}


def original_class(module: nn.Module) -> type | None:
    """The class `module` had before fastft swapped it, or None if it was not swapped."""
    return getattr(type(module), "_fastft_original_class", None)


def swap_class(module: nn.Module, forward, runs: str) -> None:
    """Give `module` a subclass of its class whose forward is `forward(self, *args, **kwargs)` (which reaches the
    original through `original_class(self).forward`); `runs` says what that forward runs, for the docstring."""
    original = type(module)
    key = (original, forward)
    if key not in _SUBCLASSES:
        @functools.wraps(original.forward)  # the original signature: Trainer keeps the dataset columns it names
        def fused_forward(self, *args, **kwargs):
            return forward(self, *args, **kwargs)

        _SUBCLASSES[key] = type(f"Fastft{original.__name__}", (original,), {
            "forward": fused_forward, "_fastft_original_class": original,
            "__doc__": f"{original.__name__} whose forward runs {runs} (class swapped by fastft.patch; fastft.unpatch "
                       "restores it)."})
    module.__class__ = _SUBCLASSES[key]


def restore_classes(model: nn.Module) -> int:
    """Give every swapped module of `model` its original class back; returns how many."""
    restored = 0
    for module in model.modules():
        original = original_class(module)
        if original is not None:
            module.__class__ = original
            restored += 1
    return restored
