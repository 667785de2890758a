"""bitsandbytes' 4-bit formats (NF4 and FP4) as fastft stores them: the 16 values a code stands for, the block
sizes, the 8-bit dynamic map of double-quantized absmax, and how a flattened weight is cut into blocks and scaled
to [-1, 1] (the arithmetic follows bitsandbytes exactly; fastft/reference/nf4.py builds the specification on it).
"""

from __future__ import annotations

import torch

NF4_LUT = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit) as bitsandbytes stores it, normalized by its largest magnitude (12).
_FP4_RAW = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, -0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0)
QUANT_TYPES = ("nf4", "fp4")
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256


def lut(quant_type: str) -> torch.Tensor:
    """The 16 fp32 values a 4-bit code stands for, indexed by code."""
    if quant_type == "nf4":
        return torch.tensor(NF4_LUT, dtype=torch.float32)
    if quant_type == "fp4":
        raw = torch.tensor(_FP4_RAW, dtype=torch.float32)
        return raw / raw.abs().max()
    raise ValueError(f"quant_type must be one of {QUANT_TYPES}, got {quant_type!r}")


def quantize_tables(quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(midpoints, order): 15 fp32 midpoints between sorted LUT values, and the code of each sorted slot."""
    values = lut(quant_type)
    order = torch.argsort(values, stable=True)
    ordered = values[order]
    midpoints = (ordered[:-1] + ordered[1:]) / 2
    return midpoints, order.to(torch.uint8)


def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 sorted fp32 values) used for double-quantized absmax.

    Each of 7 decades 10^(i-6) holds the midpoints of an fp32 linspace(0.1, 1, 2^i + 1), with both signs,
    plus 0 and 1. The values are rounded to fp32 the way bitsandbytes builds them.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        decade = (10 ** (i - 6)) * mids
        values += decade.tolist() + (-decade).tolist()
    values += [0.0] * (256 - len(values))
    return torch.tensor(sorted(values), dtype=torch.float32)


def block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """fp32 max |x| of each block of `flat`; a partial last block gets its own, clamped to >= 1e-38 (as in bnb)."""
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if full < n:
        absmax = torch.cat([absmax, flat[full:].abs().amax().clamp(min=1e-38).reshape(1)])
    return absmax


def scale_to_unit(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """x / absmax clamped to [-1, 1]: full blocks multiply by fp32(1/absmax), a partial last block divides."""
    n = flat.numel()
    full = n - n % blocksize
    safe = absmax.clamp(min=1e-38)
    scaled = (flat[:full].reshape(-1, blocksize) * (1.0 / safe[: full // blocksize]).unsqueeze(1)).reshape(-1)
    if full < n:
        scaled = torch.cat([scaled, flat[full:] / safe[-1]])
    return scaled.clamp(-1, 1)
