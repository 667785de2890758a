"""Plain-torch ground truth of fastft's LoRA op: peft's math, with a counter-based dropout mask.

Dropout keeps element e of a (rows, K) tensor iff hash(seed, e) >= threshold(p), where hash is a 32-bit integer
mixer of the element's flat index and the seed: the mask is a pure function of (seed, index), so backward and
gradient-checkpointing recomputation regenerate it instead of storing it. Kept values are scaled by 1/(1-p).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastft.formats.lora import M32, dropout_threshold  # noqa: F401  (re-exported)


def mix32(h: Tensor) -> Tensor:
    """A 32-bit avalanche mixer on int64 tensors holding values < 2^32 (wrapping multiplies, low 32 bits kept)."""
    h = h ^ (h >> 16)
    h = (h * 0x7FEB352D) & M32
    h = h ^ (h >> 15)
    h = (h * 0x846CA68B) & M32
    return h ^ (h >> 16)


def dropout_keep_ref(numel: int, p: float, seed: int, device=None) -> Tensor:
    """bool (numel,): which elements dropout keeps for this seed."""
    index = torch.arange(numel, dtype=torch.int64, device=device)
    seed_mix = mix32(torch.tensor(seed & M32, dtype=torch.int64, device=device))
    h = mix32((index & M32) ^ mix32((index >> 32) ^ seed_mix))
    return h >= dropout_threshold(p)


def lora_dropout_ref(x: Tensor, p: float, seed: int) -> Tensor:
    """x * keep / (1 - p) in x's dtype, with the mask of `dropout_keep_ref` over x's row-major elements."""
    if p == 0.0:
        return x.clone()
    keep = dropout_keep_ref(x.numel(), p, seed, x.device).view(x.shape)
    return x * keep.to(x.dtype) * (1.0 / (1.0 - p))


def lora_delta_ref(x: Tensor, lora_A: Tensor, lora_B: Tensor, scale: float, dropout_p: float, seed: int,
                   lora_bias: Tensor | None = None) -> Tensor:
    """peft's LoRA term: scale * lora_B(lora_A(dropout(x.to(lora_A.dtype)))), lora_B's bias included."""
    dropped = lora_dropout_ref(x.to(lora_A.dtype).contiguous(), dropout_p, seed)
    return torch.nn.functional.linear(dropped @ lora_A.t(), lora_B, lora_bias) * scale
