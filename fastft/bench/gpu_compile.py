"""Ahead-of-time compile check of every Triton kernel for A100 (sm_80) and H100/H200 (sm_90), without a GPU.

The interpreter (what the tests marked triton_interpreter run) checks the arithmetic; only the real compiler sees shared memory, registers
and whether tl.dot reaches the tensor cores. This module
1. calls the launchers of fastft.kernels as fastft.ops does, on meta tensors (shapes and dtypes, no memory) at
   Llama-8B sizes, and records each `kernel[grid](...)` launch instead of running it;
2. expands every launch of a tuned GEMM kernel (fastft.kernels.common.TUNED) over the configurations its autotuner
   may pick for those arguments (after pruning; the heuristic's pick is one of them);
3. specializes each as Triton's JIT would at run time (i32 / i64 scalars, divisibility by 16, constexprs, warps,
   stages, options) and compiles it to a cubin for each target with ptxas' resource report: registers, spilled
   bytes, shared memory against the block limit, and the MMA instruction tl.dot lowered to.

A row fails on a compile error, shared memory above the target's limit, or spill stores above SPILL_BUDGET bytes.
`fastft bench --suite gpu-compile` (or `python -m fastft.bench.gpu_compile`) runs the full sweep; the test
tests/kernels/test_triton_compile.py runs `sweep(full=False)`, a representative set: every configuration of every list in
fp32 (the largest tiles in shared memory and registers, TF32x3 MMAs), the heuristic's configuration in bf16, at the
heaviest flags (double quantization, bias, dropout) and the sizes that select each list.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import re
import sys
import tempfile
import time
from typing import Any, Callable, Iterator

import torch

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # opt-in maximum shared memory per block, bytes
# Spill budget (ptxas' "bytes spill stores" per thread): 16 bytes, a few registers' worth of spill that ptxas
# places outside the main loop; anything above it is a tile too big for the register file.
SPILL_BUDGET = 16
TOKENS, HIDDEN, INTERMEDIATE, VOCAB = 4096, 4096, 14336, 128256
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
SHORT = {F32: "fp32", F16: "fp16", BF16: "bf16"}


def meta(*shape, dtype=F32) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, device="meta")


@dataclasses.dataclass
class Launch:
    kernel: Any
    args: tuple
    kwargs: dict
    case: str = ""
    dtype: str = ""


@contextlib.contextmanager
def _recording() -> Iterator[list[Launch]]:
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append(Launch(self, args, dict(kwargs)))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


# ---- the launcher calls -------------------------------------------------------------------------------------------

def _nf4_cases(full: bool) -> Iterator[tuple[str, str, Callable]]:
    from fastft.kernels import nf4

    def weight(n, k, nested, blocksize=64):
        blocks = -(-n * k // blocksize)
        packed = meta((n * k + 1) // 2, 1, dtype=torch.uint8)
        if nested:
            return (packed, meta(blocks, dtype=torch.uint8), meta(16), blocksize, meta(-(-blocks // 256)), meta(256),
                    256, 0.01)
        return packed, meta(blocks), meta(16), blocksize, None, None, 256, 0.0

    n, k = INTERMEDIATE, HIDDEN
    for dtype in (F32, F16, BF16) if full else (F32, BF16):
        for nested in (True, False) if full else (True,):
            yield ("nf4_dequantize", SHORT[dtype], lambda d=dtype, q=nested: nf4.nf4_dequantize(
                *weight(n, k, q), (n, k), d))
            for rows in (1, 32, 100, TOKENS) if full else (1, TOKENS):
                for bias in (True, False) if full else (True,):
                    yield (f"nf4_linear M={rows} nested={nested} bias={bias}", SHORT[dtype],
                           lambda d=dtype, q=nested, m=rows, b=bias: nf4.nf4_linear(
                               meta(m, k, dtype=d), *weight(n, k, q), n, meta(n, dtype=d) if b else None))
                yield (f"nf4_linear_grad_input M={rows} nested={nested}", SHORT[dtype],
                       lambda d=dtype, q=nested, m=rows: nf4.nf4_linear_grad_input(
                           meta(m, n, dtype=d), *weight(n, k, q), k))
                # odd K: the ELEMENTS path
                yield (f"nf4_linear (odd K) M={rows} nested={nested}", SHORT[dtype],
                       lambda d=dtype, q=nested, m=rows: (
                           nf4.nf4_linear(meta(m, k + 1, dtype=d), *weight(n, k + 1, q), n, None),
                           nf4.nf4_linear_grad_input(meta(m, n, dtype=d), *weight(n, k + 1, q), k + 1)))


def _lora_cases(full: bool):
    from fastft.kernels import lora

    pairs = [(F32, F32), (BF16, F32), (BF16, BF16), (F16, F16), (F16, F32)] if full else [(F32, F32), (BF16, F32),
                                                                                           (BF16, BF16)]
    for x_dtype, a_dtype in pairs:
        for rank in (8, 16, 32, 64, 128, 256) if full else (16, 64, 256):  # BLOCK_R classes: <=32, 64, >64
            def run(x_dtype=x_dtype, a_dtype=a_dtype, rank=rank):
                group = lora.AdapterGroup([rank], 0.1, [1], torch.device("meta"))
                x, a, du = meta(TOKENS, HIDDEN, dtype=x_dtype), meta(rank, HIDDEN, dtype=a_dtype), meta(
                    TOKENS, rank, dtype=a_dtype)
                lora.lora_down(x, a, group)
                lora.lora_grad_x(du, a, group, x_dtype)
                lora.lora_grad_a(du, x, group)
            yield f"lora r={rank} p=0.1", f"x={SHORT[x_dtype]} A={SHORT[a_dtype]}", run
    yield "lora_dropout", "bf16", lambda: lora.lora_dropout(meta(TOKENS, HIDDEN, dtype=BF16), 0.1, 1)


def _bottleneck_cases(full: bool):
    from fastft.kernels import bottleneck

    r = 64
    for dtype in (F32, F16, BF16) if full else (F32, BF16):
        for act in tuple(bottleneck._ACTIVATION_IDS) if full else ("gelu",):
            def run(dtype=dtype, act=act):
                v, dy = meta(TOKENS, HIDDEN, dtype=dtype), meta(TOKENS, HIDDEN, dtype=dtype)
                w_down, w_up, z = meta(r, HIDDEN, dtype=dtype), meta(HIDDEN, r, dtype=dtype), meta(TOKENS, r,
                                                                                                  dtype=dtype)
                bottleneck.bottleneck_down(v, w_down, meta(r, dtype=dtype), act)
                bottleneck.activation_grad_matmul(dy, w_up, z, 0.5, act)
                bottleneck.residual_matmul(v, z, w_up.t(), meta(HIDDEN, dtype=dtype), 0.5)
                bottleneck.residual_matmul(dy, z, w_down, None, 1.0)
            yield f"bottleneck {act} r={r}", SHORT[dtype], run


def _distillation_cases(full: bool):
    from fastft.kernels import distillation

    rows = 96
    for beta in (0.0, 1.0, 0.5):
        yield (f"distill_soft_rows beta={beta}", "fp32", lambda beta=beta: distillation.distill_soft_rows(
            meta(rows, VOCAB), meta(rows, VOCAB), 2.0, beta, 1.0 / TOKENS, True))


def _logprobs_cases(full: bool):
    from fastft.kernels import logprobs

    rows = 256
    labels = meta(rows, dtype=torch.int64)
    for entropy, grad in ((False, False), (True, False), (False, True), (True, True)):
        yield (f"logprob_rows entropy={entropy} grad={grad}", "fp32", lambda e=entropy, g=grad: logprobs.logprob_rows(
            meta(rows, VOCAB), labels, e, meta(rows) if g else None, meta(rows) if g and e else None))


def _qat_cases(full: bool):
    from fastft.kernels import qat

    for dtype in (F32, F16, BF16) if full else (F32, BF16):
        for group in (32, HIDDEN) if full else (32,):
            yield (f"fake_quantize group={group}", SHORT[dtype], lambda d=dtype, g=group: (
                qat.fake_quantize(meta(INTERMEDIATE, HIDDEN, dtype=d), g, -8, 7, True, 1e-6),
                qat.fake_quantize_backward(meta(INTERMEDIATE, HIDDEN, dtype=d), meta(INTERMEDIATE, HIDDEN, dtype=d),
                                           g, -8, 7, False, 1e-6)))
        yield ("fake_quantize_with_scale", SHORT[dtype], lambda d=dtype: (
            qat.fake_quantize_with_scale(meta(INTERMEDIATE, HIDDEN, dtype=d), meta(INTERMEDIATE * HIDDEN // 32),
                                     meta(INTERMEDIATE * HIDDEN // 32), 32, -8, 7),
            qat.fake_quantize_with_scale_backward(meta(INTERMEDIATE, HIDDEN, dtype=d), meta(INTERMEDIATE, HIDDEN, dtype=d),
                                              meta(INTERMEDIATE * HIDDEN // 32), meta(INTERMEDIATE * HIDDEN // 32),
                                              32, -8, 7)))
        for quantize_x, quantize_w in ((True, True), (False, True)):
            def fused(d=dtype, qx=quantize_x, qw=quantize_w):
                x, w = meta(TOKENS, HIDDEN, dtype=d), meta(INTERMEDIATE, HIDDEN, dtype=d)
                ops = qat.FakeQuantOperands(x, w, 32, (-128, 127) if qx else None, (-8, 7) if qw else None, 1e-6)
                dy = meta(TOKENS, INTERMEDIATE, dtype=d)
                qat.fake_quant_matmul(ops, meta(INTERMEDIATE, dtype=d))
                qat.fake_quant_matmul_grad_x(ops, dy)
                qat.fake_quant_matmul_grad_w(ops, dy)
            yield f"fake_quant_linear x={quantize_x} w={quantize_w}", SHORT[dtype], fused


def _routed_lora_cases(full: bool):
    from fastft.kernels import routed_lora

    def run(x_dtype, a_dtype, rank, count=4):
        rank_tile = routed_lora.block_r([rank])
        block_m = routed_lora.block_m(rank_tile, a_dtype)
        tiles = TOKENS // block_m + count
        routing = routed_lora.Routing(meta(TOKENS, dtype=torch.int64), meta(count + 1, dtype=torch.int32),
                                      meta(tiles, 3, dtype=torch.int32), block_m, True)
        x, a, b = meta(TOKENS, HIDDEN, dtype=x_dtype), meta(count * rank, HIDDEN, dtype=a_dtype), meta(
            HIDDEN, count * rank, dtype=a_dtype)
        offsets, scales = meta(count + 1, dtype=torch.int32), meta(count)
        routed_lora.routed_lora(x, a, b, offsets, scales, routing, rank_tile)
        routed_lora.routed_lora_backward(meta(TOKENS, HIDDEN, dtype=a_dtype), x, a, b, offsets, scales, routing,
                                         rank_tile, True)

    for rank in (16, 64, 128) if full else (16, 128):
        for x_dtype, a_dtype in ((BF16, F32), (F32, F32), (BF16, BF16)) if full else ((F32, F32), (BF16, BF16)):
            yield (f"routed_lora r={rank}", f"x={SHORT[x_dtype]} A={SHORT[a_dtype]}",
                   lambda x=x_dtype, a=a_dtype, r=rank: run(x, a, r))


def _ewc_cases(full: bool):
    from fastft.kernels import ewc

    shapes = ((INTERMEDIATE, HIDDEN), (HIDDEN,), (VOCAB, HIDDEN))
    for param_dtype, storage_dtype in ((F32, F32), (BF16, BF16), (F32, BF16)) if full else ((F32, F32), (BF16, BF16)):
        def run(p=param_dtype, s=storage_dtype):
            ewc.ewc_penalty([meta(*shape, dtype=p) for shape in shapes], [meta(*shape, dtype=p) for shape in shapes],
                            [meta(*shape, dtype=s) for shape in shapes], [meta(*shape, dtype=s) for shape in shapes],
                            1.0)
        yield f"ewc_penalty storage={SHORT[storage_dtype]}", SHORT[param_dtype], run


CASES = (_nf4_cases, _lora_cases, _bottleneck_cases, _distillation_cases, _logprobs_cases, _qat_cases, _ewc_cases,
         _routed_lora_cases)


def collect(full: bool, only: tuple[str, ...] = ()) -> list[Launch]:
    """Every launch the cases make, each tuned launch expanded over its candidate configurations."""
    from fastft.kernels.common import tuned_for

    launches = []
    for cases in CASES:
        for label, dtype, call in cases(full):
            with _recording() as recorded:
                call()
            if not recorded:
                raise RuntimeError(f"{label} launched no kernel")
            for launch in recorded:
                if only and not any(word in launch.kernel.__name__ or word in label for word in only):
                    continue
                tuned = tuned_for(launch.kernel, launch.kwargs)
                if tuned is None:
                    launches.append(Launch(launch.kernel, launch.args, launch.kwargs, label, dtype))
                    continue
                named = dict(zip(launch.kernel.arg_names, launch.args), **launch.kwargs)
                configs = tuned.candidates(**named)
                if not full and "fp32" not in dtype:  # half types: the heuristic's pick (fp32 takes every config)
                    configs = [tuned.heuristic(**named)]
                for config in configs:
                    kwargs = {**launch.kwargs, **config.kwargs, "num_warps": config.num_warps,
                              "num_stages": config.num_stages}
                    launches.append(Launch(launch.kernel, launch.args, kwargs, label, dtype))
    return launches


# ---- compiling ----------------------------------------------------------------------------------------------------

def _specialize(launch: Launch, target):
    """(ASTSource, options) the JIT would compile for this launch on `target` (Triton 3.9 internals)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound_args, specialization, options = binder(*launch.args, **launch.kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, launch.kwargs, bound_args, specialization,
                                                              options)
    return ASTSource(kernel, signature, constexprs, attrs), options


@dataclasses.dataclass
class Result:
    kernel: str
    config: str
    dtype: str
    case: str
    arch: int
    error: str = ""
    regs: int = -1
    spill: int = -1
    smem: int = -1
    dot: str = "-"
    seconds: float = 0.0

    @property
    def status(self) -> str:
        if self.error:
            return "FAIL"
        if self.smem > SMEM_LIMIT[self.arch]:
            return "SMEM>"
        if self.spill > SPILL_BUDGET:
            return "spill"
        return "ok"


def _describe(launch: Launch) -> str:
    parts = []
    for name, value in launch.kwargs.items():
        if name in ("INTERPRET_BF16", "num_warps", "num_stages", "enable_fp_fusion"):
            continue
        if isinstance(value, bool):
            parts.append(name if value else f"!{name}")
        else:
            parts.append(f"{name.replace('BLOCK_', 'B')}={value}")
    parts.append(f"w{launch.kwargs.get('num_warps', 4)}s{launch.kwargs.get('num_stages', 3)}")
    return " ".join(parts)


def compile_one(launch: Launch, arch: int) -> Result:
    import triton
    from triton.backends.compiler import GPUTarget

    result = Result(launch.kernel.__name__, _describe(launch), launch.dtype, launch.case, arch)
    started = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    log = io.StringIO()
    try:
        src, options = _specialize(launch, target)
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(src, target=target, options=options.__dict__)
    except Exception as error:  # noqa: BLE001 - a compile failure is a result
        chain = [error]
        while chain[-1].__cause__ is not None and len(chain) < 20:
            chain.append(chain[-1].__cause__)
        result.error = f"{type(chain[-1]).__name__}: {str(chain[-1]).strip().splitlines()[-1:]}"
        result.seconds = time.perf_counter() - started
        return result
    ptxas = log.getvalue()
    regs = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores", ptxas)
    result.regs = int(regs.group(1)) if regs else -1
    result.spill = int(spills.group(1)) if spills else -1
    result.smem = compiled.metadata.shared
    ptx = compiled.asm["ptx"]
    if "tt.dot" in compiled.asm["ttir"]:
        result.dot = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "fma"
    result.seconds = time.perf_counter() - started
    return result


def sweep(full: bool, archs=(80, 90), only: tuple[str, ...] = (), out=sys.stdout) -> list[Result]:
    """Compile every distinct launch for every target; print one row per result as it comes, then the summary."""
    os.environ.pop("TRITON_INTERPRET", None)
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v: registers and spills
    import triton
    from triton.backends.compiler import GPUTarget

    if triton.knobs.runtime.interpret:
        raise RuntimeError("the compile check needs the compiler: run it without TRITON_INTERPRET=1")
    with tempfile.TemporaryDirectory(prefix="fastft-aot-") as cache:  # a fresh cache: ptxas runs and reports
        previous = os.environ.get("TRITON_CACHE_DIR")
        os.environ["TRITON_CACHE_DIR"] = cache
        try:
            launches, seen = [], set()
            for launch in collect(full, only):
                src, options = _specialize(launch, GPUTarget("cuda", 90, 32))
                key = (launch.kernel.__name__, src.hash(), repr(sorted(options.__dict__.items())))
                if key not in seen:
                    seen.add(key)
                    launches.append(launch)
            print(f"triton {triton.__version__}: {len(launches)} specializations x {len(archs)} targets "
                  f"(smem limits: " + ", ".join(f"sm_{a} {SMEM_LIMIT[a] // 1024} KB" for a in archs)
                  + f"; spill budget {SPILL_BUDGET} B)", file=out, flush=True)
            results = []
            for launch in launches:
                for arch in archs:
                    r = compile_one(launch, arch)
                    results.append(r)
                    print(f"{r.status:5} sm_{arch} {r.kernel} [{r.config}] {r.dtype}: regs {r.regs} spill {r.spill} "
                          f"smem {r.smem / 1024:.0f} KB dot {r.dot} ({r.seconds:.1f} s){' ' + r.error if r.error else ''}",
                          file=out, flush=True)
        finally:
            if previous is None:
                os.environ.pop("TRITON_CACHE_DIR", None)
            else:
                os.environ["TRITON_CACHE_DIR"] = previous
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "FAIL", "SMEM>", "spill")}
    print(f"\n{len(results)} compiles: {counts['ok']} ok, {counts['FAIL']} failed, {counts['SMEM>']} over the "
          f"shared-memory limit, {counts['spill']} spilling above {SPILL_BUDGET} B; max smem "
          + ", ".join(f"sm_{a} {max((r.smem for r in results if r.arch == a), default=0) / 1024:.0f} KB" for a in archs)
          + f", max regs {max((r.regs for r in results), default=0)}", file=out, flush=True)
    return results


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the test's representative set instead of the sweep")
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 90], choices=sorted(SMEM_LIMIT))
    parser.add_argument("--only", nargs="*", default=[], help="substrings of kernel or case names to keep")
    args = parser.parse_args(argv)
    results = sweep(not args.quick, tuple(args.arch), tuple(args.only))
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
