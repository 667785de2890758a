"""Triton kernel of LoRA's counter-based dropout (see fastft/reference/lora.py for the mask's definition).

One pass: reads x, writes x * keep / (1 - p); 2 * itemsize bytes and ~12 integer ops per element, no mask stored.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _mix32(h):
    h = h ^ (h >> 16)
    h = h * 0x7FEB352D
    h = h ^ (h >> 15)
    h = h * 0x846CA68B
    return h ^ (h >> 16)


@triton.jit(do_not_specialize=["seed_mix", "threshold"])
def _lora_dropout_kernel(x_ptr, out_ptr, numel, seed_mix, threshold, scale, BLOCK: tl.constexpr):
    # seed_mix and threshold arrive as i32 or i64 depending on their value: compare and mix as uint32.
    index = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = index < numel
    low = (index & 0xFFFFFFFF).to(tl.uint32)
    high = (index >> 32).to(tl.uint32)
    h = _mix32(low ^ _mix32(high ^ seed_mix.to(tl.uint32)))
    x = tl.load(x_ptr + index, mask=mask, other=0.0)
    kept = tl.where(h >= threshold.to(tl.uint32), x.to(tl.float32) * scale, 0.0)
    tl.store(out_ptr + index, kept.to(out_ptr.dtype.element_ty), mask=mask)


def lora_dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """x * keep / (1 - p) for contiguous x, the mask a function of (seed, flat index)."""
    from fastft.reference.lora import dropout_threshold, mix32

    out = torch.empty_like(x)
    seed_mix = int(mix32(torch.tensor(seed & 0xFFFFFFFF, dtype=torch.int64)))
    block = 1024
    _lora_dropout_kernel[(triton.cdiv(x.numel(), block),)](
        x, out, x.numel(), seed_mix, dropout_threshold(p), 1.0 / (1.0 - p),
        BLOCK=block)
    return out
