"""Quantization-aware fine-tuning: fake quantization with torchao's exact numerics, in one pass per group."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastft.ops import qat as qat_ops
from fastft.reference.qat import GRANULARITIES, default_eps, group_length, qrange

__all__ = ["GRANULARITIES", "fake_quantize"]  # and prepare, convert (loaded on first use)


def __getattr__(name):
    # prepare / convert live with the transformers integration; loaded on first use.
    if name in ("prepare", "convert"):
        from fastft.integrations import qat

        return getattr(qat, name)
    raise AttributeError(f"module 'fastft.qat' has no attribute {name!r}")


def fake_quantize(x: Tensor, bits: int = 4, group_size: int = 32, symmetric: bool = True,
                  granularity: str = "per_group", eps: Optional[float] = None) -> Tensor:
    """Fake-quantize x (..., K) (fp32 / fp16 / bf16) like torchao's `IntxFakeQuantizer` with
    `IntxFakeQuantizeConfig(torch.int{bits}, granularity, group_size=..., is_symmetric=...)`: bit-exact outputs and
    gradients (straight-through inside the range, zero where clamped). Supported: symmetric per_group /
    per_channel (weights), asymmetric per_token (activations); bits 2..8. The result has x's shape and dtype."""
    if not isinstance(x, Tensor) or x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be a float32, float16 or bfloat16 tensor, got "
                        f"{x.dtype if isinstance(x, Tensor) else type(x).__name__}")
    qrange(bits)
    group = group_length(x.shape, group_size, granularity, symmetric)
    return qat_ops.fake_quantize(x.contiguous(), bits, group, symmetric, default_eps(x.dtype, eps))
