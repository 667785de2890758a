"""Plain-torch ground truth of bitsandbytes' 4-bit formats (NF4 and FP4).

The arithmetic follows bitsandbytes exactly (see shared anchors): a block is `blocksize` consecutive elements of
the row-major flattened weight; codes are the number of fp32 midpoints between sorted LUT values that lie strictly
below the scaled value; two codes per byte, the first element in the high nibble; dequantization is
`cast(fp32(LUT[code] * absmax))`. These functions are the specification, the fallback path and the test oracle.
"""

from __future__ import annotations

import torch

from fastft.formats.nf4 import (  # noqa: F401  (the format, re-exported with the specification)
    BLOCKSIZES, NESTED_BLOCKSIZE, NF4_LUT, QUANT_TYPES, block_absmax, dynamic_map, lut, quantize_tables, scale_to_unit,
)


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
