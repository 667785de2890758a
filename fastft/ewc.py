"""The EWC penalty's value and gradient in one fused pass (the op: fastft/ops/ewc.py, formula:
fastft/reference/ewc.py).

    penalty = fastft.ewc.ewc_penalty_(params, grads, fisher, anchor, lam)   # after loss.backward()

What the arguments must be (anything else raises a ValueError or TypeError naming the argument):
- params: a list of floating tensors (fp32, bf16, fp16 or fp64), contiguous, on one device.
- grads: one tensor per parameter, of its shape, dtype and device, contiguous: updated in place.
- fisher, anchor: one tensor per parameter, of its shape and device, contiguous, fp32, bf16 or fp64, the anchor
  of its Fisher's dtype.
- lam: a finite real number >= 0.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from fastft.ops import ewc as ewc_ops

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
STORAGE_DTYPES = (torch.float32, torch.bfloat16, torch.float64)


def _check(params, grads, fisher, anchor, lam) -> None:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) or lam < 0:
        raise ValueError(f"lam must be a finite real number >= 0, got {lam!r}")
    lists = dict(params=params, grads=grads, fisher=fisher, anchor=anchor)
    for name, value in lists.items():
        if not isinstance(value, (list, tuple)) or not all(isinstance(t, Tensor) for t in value):
            raise TypeError(f"{name} must be a list of tensors, got {type(value).__name__}")
        if len(value) != len(params):
            raise ValueError(f"{name} must have one tensor per parameter ({len(params)}), got {len(value)}")
    for i, p in enumerate(params):
        if p.dtype not in PARAM_DTYPES:
            raise TypeError(f"params[{i}] must be fp32, bf16, fp16 or fp64, got {p.dtype}")
        for name, t in (("params", p), ("grads", grads[i]), ("fisher", fisher[i]), ("anchor", anchor[i])):
            if t.shape != p.shape:
                raise ValueError(f"{name}[{i}] must have its parameter's shape {tuple(p.shape)}, got {tuple(t.shape)}")
            if t.device != params[0].device:
                raise ValueError(f"{name}[{i}] is on {t.device}, expected {params[0].device} (one device for all)")
            if not t.is_contiguous():
                raise ValueError(f"{name}[{i}] must be contiguous")
        if grads[i].dtype != p.dtype:
            raise TypeError(f"grads[{i}] must have its parameter's dtype {p.dtype}, got {grads[i].dtype}")
        if fisher[i].dtype not in STORAGE_DTYPES:
            raise TypeError(f"fisher[{i}] must be fp32, bf16 or fp64, got {fisher[i].dtype}")
        if anchor[i].dtype != fisher[i].dtype:
            raise TypeError(f"anchor[{i}] must have its Fisher's dtype {fisher[i].dtype}, got {anchor[i].dtype}")


def ewc_penalty_(params: list[Tensor], grads: list[Tensor], fisher: list[Tensor], anchor: list[Tensor],
                 lam: float) -> Tensor:
    """Adds lam * F * (theta - theta*) into each grads[i] in place and returns lam / 2 * sum F (theta - theta*)^2,
    a 0-d tensor (fp64 when params[0] is fp64, else fp32), in one pass over all the tensors."""
    _check(params, grads, fisher, anchor, lam)
    if not params:
        return torch.zeros(())
    with torch.no_grad():
        return ewc_ops.ewc_penalty(list(params), list(grads), list(fisher), list(anchor), float(lam))
