"""The integer grids of fastft's fake quantization (torchao's): the granularities, the signed range of `bits`, how
many consecutive last-dim elements share one scale, and the default lower bound of a scale. Validators of those
options live here, with the definitions; fastft/reference/qat.py holds the arithmetic.
"""

from __future__ import annotations

from typing import Optional

import torch

GRANULARITIES = ("per_group", "per_channel", "per_token")


def qrange(bits: int) -> tuple[int, int]:
    if not isinstance(bits, int) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8, got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def group_length(shape, group_size: int, granularity: str, symmetric: bool) -> int:
    """The number of consecutive last-dim elements sharing one scale, validated like torchao."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "per_token" and symmetric:
        raise ValueError("symmetric per_token fake quantization is not supported (torchao does not support it "
                         "either); use symmetric=False")
    if len(shape) == 0 or shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dim, got shape {tuple(shape)}")
    if granularity != "per_group":
        return shape[-1]
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if shape[-1] % group_size:
        raise ValueError(f"the last dim of x ({shape[-1]}) must be a multiple of group_size ({group_size}), "
                         "as torchao requires")
    return group_size


def default_eps(dtype: torch.dtype, eps: Optional[float]) -> float:
    return torch.finfo(dtype).smallest_normal if eps is None else float(eps)
