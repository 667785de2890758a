"""The mechanism of `fastft.patch`: a module instance's class becomes a cached subclass whose forward is fastft's.
No parameter, buffer or state_dict key changes, other instances of the class are untouched, and `restore_classes`
(used by `fastft.unpatch`) gives every swapped instance its original class back.

The subclasses are made at run time, so pickle cannot find them by name: a swapped instance pickles (torch.save,
copy.deepcopy) as its original class, fastft's forward and its state, and loads as an instance of the same cached
subclass (made again in a new process), that is, as a patched module."""

from __future__ import annotations

import functools

from torch import nn

_SUBCLASSES: dict[tuple[type, object], type] = {}


def original_class(module: nn.Module) -> type | None:
    """The class `module` had before fastft swapped it, or None if it was not swapped."""
    return getattr(type(module), "_fastft_original_class", None)


def _reduce_ex(self, protocol):
    swapped = type(self)
    rebuild_args = (swapped._fastft_original_class, swapped._fastft_forward, swapped._fastft_runs)
    return _rebuild, rebuild_args, self.__getstate__()


def _rebuild(original: type, forward, runs: str) -> nn.Module:
    """An empty instance of the swapped subclass of `original` (pickle then sets its state)."""
    swapped = _subclass(original, forward, runs)
    return swapped.__new__(swapped)


def _subclass(original: type, forward, runs: str) -> type:
    key = (original, forward)
    swapped = _SUBCLASSES.get(key)
    if swapped is None:
        @functools.wraps(original.forward)  # the original signature: Trainer keeps the dataset columns it names
        def fused_forward(self, *args, **kwargs):
            return forward(self, *args, **kwargs)

        swapped = type(f"Fastft{original.__name__}", (original,), {
            "forward": fused_forward, "_fastft_original_class": original,
            "_fastft_forward": staticmethod(forward), "_fastft_runs": runs, "__reduce_ex__": _reduce_ex,
            "__doc__": f"{original.__name__} whose forward runs {runs} (class swapped by fastft.patch; fastft.unpatch "
                       "restores it)."})
        swapped = _SUBCLASSES.setdefault(key, swapped)  # one class per key, also when threads patch at once
    return swapped


def swap_class(module: nn.Module, forward, runs: str) -> None:
    """Give `module` a subclass of its class whose forward is `forward(self, *args, **kwargs)` (which reaches the
    original through `original_class(self).forward`); `runs` says what that forward runs, for the docstring.
    `forward` must be a module-level function (pickle stores it by name)."""
    module.__class__ = _subclass(type(module), forward, runs)


def restore_classes(model: nn.Module) -> int:
    """Give every swapped module of `model` its original class back; returns how many."""
    restored = 0
    for module in model.modules():
        original = original_class(module)
        if original is not None:
            module.__class__ = original
            restored += 1
    return restored
