"""The C++ kernels on their AVX-512 paths vs their AVX2 paths (`FASTFT_NO_AVX512=1`), side by side.

A process picks its vector paths once, at its first kernel call, so each path runs in its own processes: fresh
processes alternate between the two settings and each case keeps its best time. The kernels run on one thread and
are timed in that thread's CPU time, which other processes on the machine do not inflate (what is compared is the
work of one core on each path). Run as a module, this file times every case in the current process and prints the
times as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

from fastft.bench.harness import Row

AVX2_PEER = "AVX2 path (FASTFT_NO_AVX512=1)"


def _cases() -> dict:
    """name -> fn: each C++ kernel with an AVX-512 path, at LLM sizes."""
    import torch

    from fastft import nf4
    from fastft.losses import fused_linear_distillation
    from fastft.nn import BottleneckAdapter
    from fastft.qat import fake_quantize

    torch.manual_seed(0)
    ops = torch.ops.fastft
    cases = {}
    packed, state = nf4.quantize(torch.randn(4096, 4096) / 64, 64, double_quant=True)
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        out = torch.empty(4096, 4096, dtype=dtype)
        cases[f"nf4 dequantize 4096x4096 -> {name}"] = lambda out=out: nf4.dequantize(packed, state, out=out)
        for rows in (1, 4):
            x = torch.randn(rows, 4096, dtype=dtype)
            cases[f"nf4 matmul, {rows} row(s) x 4096x4096, {name}"] = lambda x=x: nf4.matmul(x, packed, state)
        dy = torch.randn(4, 4096, dtype=dtype)
        cases[f"nf4 grad input, 4 rows x 4096x4096, {name}"] = (
            lambda dy=dy: ops.nf4_linear_grad_input(dy, packed, *state.op_args(), 4096))
        x = torch.randn(4096, 4096, dtype=dtype)
        cases[f"LoRA dropout p=0.1, 4096x4096 {name}"] = lambda x=x: ops.lora_dropout(x, 0.1, 1234)
    x = torch.randn(4096, 4096)
    grad = torch.randn_like(x)
    cases["fake quantize int4 g32, 4096x4096 float32"] = lambda: fake_quantize(x, 4, 32)
    cases["fake quantize backward int4 g32, 4096x4096 float32"] = (
        lambda: ops.fake_quantize_backward(grad, x, 4, 32, True, torch.finfo(torch.float32).eps))
    for rank in (16, 64):
        adapter = BottleneckAdapter(1024, bottleneck_size=rank, activation="gelu", init="default")
        h, dy = torch.randn(4096, 1024, requires_grad=True), torch.randn(4096, 1024)
        params = [h, *adapter.parameters()]
        cases[f"bottleneck adapter fwd+bwd, 4096x1024, r={rank}"] = (
            lambda adapter=adapter, h=h, dy=dy, params=params: torch.autograd.grad(adapter(h), params, dy))
    # a narrow hidden size, so that the soft-target rows (the kernel with the AVX-512 path), not the GEMMs, dominate
    student, teacher = torch.randn(1024, 64, requires_grad=True), torch.randn(1024, 64)
    head_s, head_t = torch.randn(32000, 64) / 8, torch.randn(32000, 64) / 8
    cases["distillation rows fwd+bwd, 1024 tokens, H=64, V=32000, JSD 0.5"] = (
        lambda: fused_linear_distillation(student, head_s, teacher, head_t, beta=0.5, temperature=2.0).backward())
    return cases


def _best_cpu_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        times.append(time.thread_time() - start)
    return min(times) * 1e3


def _time_here(repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(1)
    return {name: _best_cpu_ms(fn, repeats) for name, fn in _cases().items()}


def _time_in_process(avx512: bool, repeats: int) -> dict[str, float]:
    env = dict(os.environ)
    env.pop("FASTFT_NO_AVX512", None)
    if not avx512:
        env["FASTFT_NO_AVX512"] = "1"
    result = subprocess.run([sys.executable, "-m", "fastft.bench.cpu_paths", str(repeats)], env=env,
                            capture_output=True, text=True, check=True)
    return json.loads(result.stdout.splitlines()[-1])


def run(repeats: int = 5, processes: int = 2, progress=print) -> list[Row]:
    """Best time of each case over `processes` fresh processes per path (alternating), `repeats` calls each."""
    from fastft.ops.backend import native_extension

    native = native_extension()
    if native is None or not native.has_avx512():
        progress("this CPU (or the FASTFT_NO_AVX512 setting) gives no AVX-512 path: nothing to compare")
        return []
    times = {True: {}, False: {}}
    for _ in range(processes):
        for avx512 in (True, False):
            progress(f"all cases on the {'AVX-512' if avx512 else 'AVX2'} paths, in a fresh process")
            for case, ms in _time_in_process(avx512, repeats).items():
                times[avx512][case] = min(ms, times[avx512].get(case, float("inf")))
    return [Row(f"{case} (1 thread, CPU ms)", times[True][case], AVX2_PEER, times[False][case]) for case in times[True]]


if __name__ == "__main__":
    print(json.dumps(_time_here(int(sys.argv[1]) if len(sys.argv) > 1 else 5)))
