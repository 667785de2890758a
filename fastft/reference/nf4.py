"""Plain-torch ground truth of bitsandbytes' 4-bit formats (NF4 and FP4).

The arithmetic follows bitsandbytes exactly (see shared anchors): a block is `blocksize` consecutive elements of
the row-major flattened weight; codes are the number of fp32 midpoints between sorted LUT values that lie strictly
below the scaled value; two codes per byte, the first element in the high nibble; dequantization is
`cast(fp32(LUT[code] * absmax))`. These functions are the specification, the fallback path and the test oracle.
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


def quantize_4bit_ref(
    weight: torch.Tensor, blocksize: int = 64, quant_type: str = "nf4"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize `weight` (fp32/fp16/bf16, any shape) to (packed uint8 ((n+1)//2, 1), absmax fp32 (ceil(n/blocksize),))."""
    flat = weight.reshape(-1).float()
    absmax = block_absmax(flat, blocksize)
    scaled = scale_to_unit(flat, absmax, blocksize)
    if scaled.numel() % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    midpoints, order = quantize_tables(quant_type)
    codes = order[torch.bucketize(scaled, midpoints.to(scaled.device))]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.unsqueeze(1), absmax


def unpack_codes(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """The int64 4-bit codes of the first `numel` elements (high nibble first)."""
    flat = packed.reshape(-1).view(torch.uint8).to(torch.int64)
    return torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:numel]


def nested_absmax_ref(
    absmax_codes: torch.Tensor, nested_absmax: torch.Tensor, nested_code: torch.Tensor, nested_offset: float,
    nested_blocksize: int = NESTED_BLOCKSIZE,
) -> torch.Tensor:
    """fp32 absmax of each 4-bit block from double-quant statistics: fp32(fp32(code[q] * absmax2[b // 256]) + offset)."""
    index = torch.arange(absmax_codes.numel(), device=absmax_codes.device) // nested_blocksize
    scaled = nested_code[absmax_codes.reshape(-1).long()] * nested_absmax[index]
    return scaled + torch.tensor(nested_offset, dtype=torch.float32)


def dequantize_4bit_ref(
    packed: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int, shape, dtype: torch.dtype
) -> torch.Tensor:
    """Dequantize to `shape` in `dtype`: cast(fp32(code[c] * absmax[e // blocksize])). `absmax` is fp32 per block."""
    numel = 1
    for size in shape:
        numel *= size
    values = code.to(packed.device)[unpack_codes(packed, numel)]
    block_scale = absmax.repeat_interleave(blocksize)[:numel]
    return (values * block_scale).reshape(shape).to(dtype)


def nf4_linear_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight^T + bias, with the dequantized weight already in x's dtype."""
    return torch.nn.functional.linear(x, weight, bias)
