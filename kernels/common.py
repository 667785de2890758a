"""What every Triton kernel of fastft shares: the interpreter flag, rounding helpers, the `tl.dot` wrapper and its
fp32 precision, and the launch of a GEMM kernel at an autotuned or a heuristic configuration.

fp32 GEMM operands (fp32 models, peft's fp32 adapters) go to tensor cores as TF32 (`tl.dot` input_precision), chosen
per launch from torch's own setting, `torch.get_float32_matmul_precision()`, as torch's matmuls do:
- "highest" (torch's default) -> "tf32x3": each operand split into a TF32 high part and a TF32 low part, three MMAs
  (hi*hi + hi*lo + lo*hi). With a = a_hi + a_lo + e_a, |a_lo| <= 2^-11 |a|, |e_a| <= 2^-22 |a|, the dropped part of
  a*b is a_lo*b_lo + e_a*b + a*e_b (to first order), at most 3 * 2^-22 |a*b|; the fp32 accumulation of K terms
  (3 K partial products in the MMAs; tensor cores may truncate rather than round, unit 2^-23) adds at most
  3 K 2^-23 sum_k |a_k b_k|. So |y_hat - y| <= (3 * 2^-22 + 3 K 2^-23) * sum_k |a_k b_k|: the bound of an fp32 dot
  product up to a small constant. Three MMAs per tile: 3x the tensor-core work of TF32, still ~2.5x the fp32
  CUDA-core ("ieee") rate of an H100 (495 / 3 vs 67 TFLOP/s) and without its register spills.
- "high" or "medium" -> "tf32": operands rounded to TF32 (10 explicit mantissa bits, round to nearest: relative
  error <= 2^-11 each), so each product carries at most 2^-11 + 2^-11 + 2^-22 = 2^-10 (1 + 2^-12) relative error,
  and an output |y_hat - y| <= (2^-10 (1 + 2^-12) + K 2^-23) * sum_k |a_k b_k|. That is a bound per element
  against the sum of absolute products, not against |y|: where the products cancel (|y| << sum |a b|) the relative
  error of y can be much larger than 2^-10, so tests check it elementwise against (|A| @ |B|), see
  tests/conftest.py::assert_gemm_close.
- FASTFT_FP32_PRECISION=ieee|tf32|tf32x3 overrides both (ieee: fp32 FMAs on CUDA cores, exact as the reference up
  to summation order, slow and spilling at large tiles).
The interpreter computes every `tl.dot` in fp32 numpy (precision ignored), so interpreted fp32 results stay within
the fp32 tolerance; the CPU paths (C++ and reference) never use TF32.

Autotuning: `Tuned` wraps a kernel with a short `triton.autotune` list keyed on the GEMM's sizes and a heuristic that
picks one of those configurations without measuring. The heuristic runs under TRITON_INTERPRET (one configuration,
fast tests), with FASTFT_AUTOTUNE=0 (reproducible launches, no tuning pause on the first call), and for tensors not on
CUDA. `TUNED` lists every tuned kernel so the ahead-of-time compile check can compile all of their configurations.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
import triton
import triton.language as tl

_INTERPRET = triton.knobs.runtime.interpret if hasattr(triton, "knobs") else False

FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")


def fp32_precision() -> str:
    """The `tl.dot` input precision of fp32 operands for launches made now (see the module docstring)."""
    forced = os.environ.get("FASTFT_FP32_PRECISION")
    if forced:
        if forced not in FP32_PRECISIONS:
            raise ValueError(f"FASTFT_FP32_PRECISION must be one of {FP32_PRECISIONS}, got {forced!r}")
        return forced
    return "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and not _INTERPRET and os.environ.get("FASTFT_AUTOTUNE", "1") != "0"


@triton.jit
def _to_bf16_rtne(values):
    """fp32 -> bf16 rounded to nearest even with integer ops: the same bits on GPUs and in the interpreter
    (whose float cast truncates). Inputs are finite."""
    bits = values.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to_dtype(values, dtype: tl.constexpr, INTERPRET_BF16: tl.constexpr):
    # The interpreter's fp32 -> bf16 cast truncates; round to nearest even as GPUs do.
    if INTERPRET_BF16:
        return _to_bf16_rtne(values)
    return values.to(dtype)


@triton.jit
def _dot(a, b, acc, INTERPRET_BF16: tl.constexpr, FP32_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. fp32 operands use FP32_PRECISION (tf32 / tf32x3 on tensor cores, or
    ieee); half-precision operands go to tensor cores as they are. The interpreter computes bf16 tl.dot wrongly:
    there the bf16 operands go through an fp32 dot (same products, fp32 accumulation)."""
    if INTERPRET_BF16:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision=FP32_PRECISION)
    return tl.dot(a, b, acc)


class Tuned:
    """A GEMM kernel launched at an autotuned configuration (on CUDA, FASTFT_AUTOTUNE != 0, not interpreting) or at
    the configuration `heuristic(**sizes)` picks. Every configuration is a `triton.Config` of constexpr block sizes
    plus num_warps / num_stages; `configs` is the autotune list, which holds every configuration the heuristic can
    return (checked by the compile test), so what runs is always something the compile test compiled.

    launch(grid, args, sizes, device, **constexprs): `grid(meta)` the launch grid from a configuration's kwargs,
    `args` the leading positional kernel arguments, `sizes` the dict of GEMM sizes the tuning key reads (passed to
    the kernel as its trailing scalar arguments, in order: the kernel declares them last), `constexprs` the
    remaining flags. `heuristic(**arguments)` and `prune(config, **arguments)` take the launch's named arguments
    (tensors, sizes, constexprs) as keywords and ignore the ones they do not use. `when`: the constexprs under which the launcher uses this list (a kernel
    can have several lists)."""

    def __init__(self, kernel, configs: list[triton.Config], key: list[str],
                 heuristic: Callable[..., triton.Config], prune: Callable | None = None, when: dict | None = None):
        self.kernel, self.configs, self.heuristic, self.key = kernel, configs, heuristic, key
        self.prune, self.when = prune, when or {}
        prune_by = {"early_config_prune": self._early_prune} if prune else None
        self.tuner = triton.autotune(configs=configs, key=key, prune_configs_by=prune_by)(kernel)
        TUNED.append(self)

    def _early_prune(self, configs, named_args, **kwargs):
        return self.candidates(**named_args, **kwargs)

    def candidates(self, **arguments) -> list[triton.Config]:
        """The configurations the autotuner may time for a launch with these (named) arguments, after pruning."""
        if self.prune is None:
            return list(self.configs)
        return [c for c in self.configs if self.prune(c, **arguments)] or self.configs[:1]

    def launch(self, grid: Callable[[dict], tuple], args: tuple, sizes: dict, device: torch.device, **constexprs):
        if autotune_enabled(device):
            self.tuner[grid](*args, *sizes.values(), **constexprs)
            return
        config = self.heuristic(**dict(zip(self.kernel.arg_names, (*args, *sizes.values()))), **constexprs)
        meta = dict(config.kwargs)
        self.kernel[grid(meta)](*args, *sizes.values(), **meta, **constexprs, num_warps=config.num_warps,
                                num_stages=config.num_stages)


TUNED: list[Tuned] = []


def tuned_for(kernel, constexprs: dict) -> Tuned | None:
    """The configuration list a launcher uses for `kernel` launched with these constexprs, if it is tuned."""
    for tuned in TUNED:
        if tuned.kernel is kernel and all(constexprs.get(k) == v for k, v in tuned.when.items()):
            return tuned
    return None


def config(num_warps: int, num_stages: int, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=num_warps, num_stages=num_stages)
