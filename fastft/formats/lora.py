"""The counter-based LoRA dropout's threshold: an element is kept iff its 32-bit hash is >= dropout_threshold(p)
(the hash itself: fastft/reference/lora.py, csrc/lora.cpp, kernels/lora.py)."""

from __future__ import annotations

M32 = 0xFFFFFFFF  # hashes are 32-bit words


def dropout_threshold(p: float) -> int:
    """Keep iff hash >= this: P(keep) = 1 - p up to 2^-32."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout p must be in [0, 1), got {p}")
    return min(int(round(p * 2.0**32)), M32)
