"""4-bit weights in bitsandbytes' NF4/FP4 format: quantize, dequantize and matmul, bit-exact with bitsandbytes.

    packed, state = fastft.nf4.quantize(weight, blocksize=64, double_quant=True)
    y = fastft.nf4.matmul(x, packed, state, bias)        # x @ dequantize(packed, state)^T + bias, differentiable in x

`packed` is uint8 of shape ((numel+1)//2, 1) like bitsandbytes' `Params4bit`; `NF4State` holds the rest and
converts to and from a bitsandbytes `QuantState` sharing the same tensors.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from fastft.formats import nf4 as nf4_format
from fastft.ops import nf4 as ops

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_KEY = "quant_state.bitsandbytes__"


def packed_bytes(storage: Tensor) -> Tensor:
    """The packed 4-bit codes of a bitsandbytes weight as uint8 (n_bytes, 1), sharing its memory. bitsandbytes'
    `quant_storage` (bf16 or fp32 in FSDP-QLoRA recipes, so that FSDP shards the 4-bit weights with the other
    parameters) only changes the element type the same bytes are held in."""
    if storage.dtype == torch.uint8:
        return storage
    if not storage.is_contiguous():
        raise ValueError("a bitsandbytes weight held in a dtype other than uint8 must be contiguous")
    return storage.view(torch.uint8).reshape(-1, 1)


@dataclass
class NF4State:
    """What, besides the packed codes, describes a 4-bit weight.

    absmax: fp32 (blocks,) per-block scale, or uint8 (blocks,) codes of it when double-quantized.
    nested_absmax: fp32 (ceil(blocks / 256),) scales of those codes; nested_code: the 256-value dynamic map;
    nested_offset: the mean absmax subtracted before quantizing it (an fp32 value).
    """

    absmax: Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int = 64
    quant_type: str = "nf4"
    code: Tensor = field(default=None)  # type: ignore[assignment]
    nested_absmax: Tensor | None = None
    nested_code: Tensor | None = None
    nested_offset: float = 0.0
    nested_blocksize: int = nf4_format.NESTED_BLOCKSIZE

    def __post_init__(self):
        self.shape = torch.Size(self.shape)
        if self.code is None:
            self.code = nf4_format.lut(self.quant_type).to(self.absmax.device)

    @property
    def double_quant(self) -> bool:
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        return self.shape.numel()

    @property
    def blocks(self) -> int:
        return -(-self.numel // self.blocksize)

    def op_args(self) -> tuple:
        """The weight statistics in the order the fastft::nf4_* ops take them after `packed`."""
        return (self.absmax, self.code, self.blocksize, self.nested_absmax, self.nested_code,
                self.nested_blocksize, self.nested_offset)

    def to(self, device) -> NF4State:
        move = (lambda t: None if t is None else t.to(device))
        return replace(self, absmax=move(self.absmax), code=move(self.code), nested_absmax=move(self.nested_absmax),
                       nested_code=move(self.nested_code))

    def validate(self, packed: Tensor, name: str = "packed") -> None:
        """Raise ValueError/TypeError unless `packed` and this state describe one weight the kernels can read: every
        tensor of the right dtype, size and device, and contiguous (the kernels index them as flat arrays)."""
        if not isinstance(packed, Tensor) or packed.dtype != torch.uint8:
            raise TypeError(f"{name} must be a uint8 tensor of packed 4-bit codes, got "
                            f"{getattr(packed, 'dtype', type(packed).__name__)}")
        if packed.numel() != (self.numel + 1) // 2:
            raise ValueError(f"{name} holds {packed.numel()} bytes but state.shape {tuple(self.shape)} needs "
                             f"{(self.numel + 1) // 2}")
        if self.blocksize not in nf4_format.BLOCKSIZES:
            raise ValueError(f"state.blocksize must be one of {nf4_format.BLOCKSIZES}, got {self.blocksize}")
        if self.quant_type not in nf4_format.QUANT_TYPES:
            raise ValueError(f"state.quant_type must be one of {nf4_format.QUANT_TYPES}, got {self.quant_type!r}")
        for key in ("absmax", "nested_absmax", "nested_code"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"state.{key} must be a tensor, got {type(value).__name__}")
        if self.absmax is None or self.absmax.numel() != self.blocks:
            raise ValueError(f"state.absmax must hold {self.blocks} entries (blocks of {self.blocksize} for shape "
                             f"{tuple(self.shape)}), got {getattr(self.absmax, 'numel', lambda: None)()}")
        if not isinstance(self.code, Tensor) or self.code.numel() != 16 or self.code.dtype != torch.float32:
            raise ValueError(f"state.code must be 16 fp32 values, got {getattr(self.code, 'numel', lambda: None)()} "
                             f"of {getattr(self.code, 'dtype', None)}")
        expected = torch.uint8 if self.double_quant else torch.float32
        if self.absmax.dtype != expected:
            raise TypeError(f"state.absmax must be {expected} {'(double quant)' if self.double_quant else ''}, "
                            f"got {self.absmax.dtype}")
        if self.double_quant:
            nested_blocks = -(-self.blocks // self.nested_blocksize) if self.nested_blocksize > 0 else -1
            if self.nested_absmax.dtype != torch.float32 or self.nested_absmax.numel() != nested_blocks:
                raise ValueError(f"state.nested_absmax must be {nested_blocks} fp32 values (blocks of "
                                 f"{self.nested_blocksize} absmax codes), got {self.nested_absmax.numel()} of "
                                 f"{self.nested_absmax.dtype}")
            if (not isinstance(self.nested_code, Tensor) or self.nested_code.numel() != 256
                    or self.nested_code.dtype != torch.float32):
                raise ValueError(f"state.nested_code must be the 256 fp32 values of the 8-bit map, got "
                                 f"{getattr(self.nested_code, 'numel', lambda: None)()} of "
                                 f"{getattr(self.nested_code, 'dtype', None)}")
            if not math.isfinite(self.nested_offset):
                raise ValueError(f"state.nested_offset must be finite, got {self.nested_offset}")
        for key, tensor in ((name, packed), ("state.absmax", self.absmax), ("state.code", self.code),
                            ("state.nested_absmax", self.nested_absmax), ("state.nested_code", self.nested_code)):
            if tensor is None:
                continue
            if tensor.device != packed.device:
                raise ValueError(f"{key} is on {tensor.device} but {name} is on {packed.device}")
            if not tensor.is_contiguous():
                raise ValueError(f"{key} must be contiguous (the kernels read it as a flat array); got strides "
                                 f"{tensor.stride()} for shape {tuple(tensor.shape)}: pass {key}.contiguous()")

    # bitsandbytes interop ------------------------------------------------------------------------------------
    def to_bnb(self):
        """A bitsandbytes QuantState sharing this state's tensors."""
        from bitsandbytes.functional import QuantState

        state2 = offset = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax, code=self.nested_code,
                                blocksize=self.nested_blocksize, dtype=torch.float32)
            offset = torch.tensor(self.nested_offset, dtype=torch.float32, device=self.absmax.device)
        return QuantState(absmax=self.absmax, shape=self.shape, code=self.code, blocksize=self.blocksize,
                          quant_type=self.quant_type, dtype=self.dtype, offset=offset, state2=state2)

    @classmethod
    def from_bnb(cls, quant_state) -> NF4State:
        """The state of a bitsandbytes QuantState, sharing its tensors."""
        nested = quant_state.state2 if quant_state.nested else None
        return cls(absmax=quant_state.absmax, shape=quant_state.shape, dtype=quant_state.dtype,
                   blocksize=quant_state.blocksize, quant_type=quant_state.quant_type, code=quant_state.code,
                   nested_absmax=None if nested is None else nested.absmax,
                   nested_code=None if nested is None else nested.code,
                   nested_offset=0.0 if nested is None else float(quant_state.offset),
                   nested_blocksize=nf4_format.NESTED_BLOCKSIZE if nested is None else nested.blocksize)

    @classmethod
    def from_bnb_weight(cls, weight) -> tuple[Tensor, NF4State]:
        """(packed, state) of a bitsandbytes `Params4bit` in bitsandbytes' standard layout, sharing its tensors
        (packed as uint8 whatever its `quant_storage`: see `packed_bytes`).

        bitsandbytes >= 0.50 repacks a `Linear4bit`'s weight for its own CPU kernel on the first eval-mode forward
        of an input without gradient on CPUs with AVX512_BF16 (`quant_state.packing_format_for_cpu`: codes
        re-laid in tiles, absmax transposed to bf16). Such a weight is converted back in place first, with
        bitsandbytes' own inverse (as its `state_dict` does), so that bitsandbytes and fastft keep reading one
        storage; its absmax keeps the bf16 rounding the repack gave it, with which bitsandbytes' CPU kernel
        computes too. `fastft.patch` also turns bitsandbytes' repack off on the layers it fuses.
        """
        quant_state = getattr(weight, "quant_state", None)
        if quant_state is None:
            raise ValueError("the bitsandbytes weight is not quantized yet (bitsandbytes quantizes on .to(device))")
        if getattr(quant_state, "packing_format_for_cpu", False):
            from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

            weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, quant_state)
            quant_state = weight.quant_state
        if not quant_state.nested and quant_state.absmax.dim() == 2:
            # bitsandbytes' inverse (here, or in its state_dict) restores the absmax of double-quantized weights
            # only; others keep the repacked (blocks per row, rows) bf16 layout: one fp32 value per block again
            quant_state.absmax = quant_state.absmax.t().reshape(-1).float()
        return packed_bytes(weight.data), cls.from_bnb(quant_state)

    def state_dict(self) -> dict[str, Tensor]:
        """bitsandbytes' serialized keys (without the 'weight.' prefix): absmax, quant_map, nested_*, quant_state.*"""
        meta: dict[str, Any] = {"quant_type": self.quant_type, "blocksize": self.blocksize,
                                "dtype": str(self.dtype).removeprefix("torch."), "shape": tuple(self.shape)}
        tensors = {"absmax": self.absmax, "quant_map": self.code}
        if self.double_quant:
            tensors.update(nested_absmax=self.nested_absmax, nested_quant_map=self.nested_code.clone())
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32",
                        nested_offset=self.nested_offset)
        payload = json.dumps(meta).encode("utf-8")
        tensors[_STATE_KEY + self.quant_type] = torch.tensor(list(payload), dtype=torch.uint8)
        return tensors

    @classmethod
    def from_state_dict(cls, tensors: dict[str, Tensor]) -> NF4State:
        """Inverse of `state_dict` (keys without the 'weight.' prefix)."""
        keys = [k for k in tensors if k.startswith(_STATE_KEY)]
        if len(keys) != 1:
            raise ValueError(f"expected exactly one '{_STATE_KEY}nf4|fp4' entry in the state dict, found {keys}")
        meta = json.loads(bytes(tensors[keys[0]].cpu().tolist()).decode("utf-8"))
        nested = "nested_absmax" in tensors
        return cls(absmax=tensors["absmax"], shape=torch.Size(meta["shape"]), dtype=getattr(torch, meta["dtype"]),
                   blocksize=int(meta["blocksize"]), quant_type=meta["quant_type"], code=tensors["quant_map"],
                   nested_absmax=tensors["nested_absmax"] if nested else None,
                   nested_code=tensors["nested_quant_map"] if nested else None,
                   nested_offset=float(meta["nested_offset"]) if nested else 0.0,
                   nested_blocksize=int(meta.get("nested_blocksize", nf4_format.NESTED_BLOCKSIZE)))


def _check_weight_to_quantize(weight: Tensor, blocksize: int, quant_type: str) -> None:
    if not isinstance(weight, Tensor) or weight.dtype not in FLOAT_DTYPES:
        raise TypeError(f"weight must be a float32, float16 or bfloat16 tensor, got "
                        f"{getattr(weight, 'dtype', type(weight).__name__)}")
    if weight.numel() == 0:
        raise ValueError("weight must not be empty")
    if isinstance(blocksize, bool) or blocksize not in nf4_format.BLOCKSIZES:
        raise ValueError(f"blocksize must be a power of two in {nf4_format.BLOCKSIZES[0]}..{nf4_format.BLOCKSIZES[-1]}, got "
                         f"{blocksize!r}")
    if quant_type not in nf4_format.QUANT_TYPES:
        raise ValueError(f"quant_type must be one of {nf4_format.QUANT_TYPES}, got {quant_type!r}")
    finite = torch.isfinite(weight)
    if not bool(finite.all()):
        bad = (~finite).nonzero()
        first = tuple(bad[0].tolist())
        raise ValueError(f"weight has {bad.shape[0]} NaN/Inf values (first at index {first}); "
                         "4-bit quantization needs finite weights")


def _quantize_blockwise_8bit(values: Tensor, blocksize: int = nf4_format.NESTED_BLOCKSIZE) -> tuple[Tensor, Tensor]:
    """Double quant's second step, bitsandbytes' 8-bit blockwise quantization of the block scales on its dynamic
    map: (codes uint8, fp32 absmax per block of `blocksize` codes)."""
    flat = values.reshape(-1).float()
    absmax = nf4_format.block_absmax(flat, blocksize)
    table = nf4_format.dynamic_map().to(flat.device)
    codes = torch.bucketize(nf4_format.scale_to_unit(flat, absmax, blocksize), (table[:-1] + table[1:]) / 2)
    return codes.to(torch.uint8), absmax


@torch.no_grad()
def quantize(weight: Tensor, blocksize: int = 64, double_quant: bool = False,
             quant_type: str = "nf4") -> tuple[Tensor, NF4State]:
    """Quantize `weight` (fp32/fp16/bf16, any shape) to bitsandbytes' 4-bit format: (packed uint8, NF4State).

    Bit-exact with `bitsandbytes.functional.quantize_4bit(weight, blocksize, compress_statistics=double_quant,
    quant_type=quant_type)` except, with double quant, the 8-bit absmax codes: each is the dynamic-map value nearest
    to fp32((absmax - offset) * fp32(1 / scale)) (ties to the lower code), where bitsandbytes 0.50's CPU quantizer
    (an approximate table lookup, then one neighbour checked) keeps a farther one for ~0.25% of them (1-3 map steps
    away; README, "Double quantization"). The offset and the nested scales are bitsandbytes' bit for bit.
    """
    _check_weight_to_quantize(weight, blocksize, quant_type)
    packed, absmax = ops.nf4_quantize(weight.contiguous(), blocksize, quant_type)
    state = NF4State(absmax=absmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                     quant_type=quant_type, code=nf4_format.lut(quant_type).to(weight.device))
    if double_quant:
        offset = absmax.mean()
        codes, nested_absmax = _quantize_blockwise_8bit(absmax - offset)
        state = replace(state, absmax=codes, nested_absmax=nested_absmax,
                        nested_code=nf4_format.dynamic_map().to(weight.device), nested_offset=float(offset))
    return packed, state


def dequantize(packed: Tensor, state: NF4State, dtype: torch.dtype | None = None, out: Tensor | None = None) -> Tensor:
    """The dense weight of `state.shape` in `dtype` (default: the quantized weight's dtype), bit-exact with bnb.

    `out`: a contiguous tensor of that shape and dtype to write into (and return). Reusing one buffer skips
    the page faults that a fresh tensor of this size costs on CPU.
    """
    state.validate(packed)
    if out is not None:
        dtype = out.dtype if dtype is None else dtype
        if out.shape != state.shape or out.dtype != dtype or not out.is_contiguous():
            raise ValueError(f"out must be a contiguous {dtype} tensor of shape {tuple(state.shape)}, got "
                             f"{'' if out.is_contiguous() else 'non-contiguous '}{out.dtype} {tuple(out.shape)}")
        if out.device != packed.device:
            raise ValueError(f"out is on {out.device} but packed is on {packed.device}")
    dtype = state.dtype if dtype is None else dtype
    if dtype not in FLOAT_DTYPES + (torch.float64,):
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    if out is not None:
        ops.nf4_dequantize_into(out, packed, *state.op_args())
        return out
    return ops.nf4_dequantize(packed, *state.op_args(), list(state.shape), dtype)


def matmul(x: Tensor, packed: Tensor, state: NF4State, bias: Tensor | None = None) -> Tensor:
    """y = x @ dequantize(packed, state)^T + bias for x (..., in_features); autograd gives dx (and dbias).

    The weight is dequantized in x's dtype, as `bitsandbytes.matmul_4bit` does; it is never materialized whole
    on the native and Triton paths, and gets no gradient.
    """
    state.validate(packed)
    if len(state.shape) != 2:
        raise ValueError(f"state.shape must be 2-D (out_features, in_features) for matmul, got {tuple(state.shape)}")
    out_features, in_features = state.shape
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise ValueError(f"x's last dim must equal the weight's in_features {in_features}, got shape {tuple(x.shape)}")
    if x.device != packed.device:
        raise ValueError(f"x is on {x.device} but packed is on {packed.device}")
    if bias is not None:
        if bias.shape != (out_features,):
            raise ValueError(f"bias must have shape ({out_features},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal x's dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")
    return ops.nf4_linear(x, packed, *state.op_args(), out_features, bias)
