"""NF4 benchmarks: fastft vs bitsandbytes (CPU) and vs dense fp32 F.linear, 4096x4096 weight, blocksize 64,
double quant. Every case runs both sides on the same inputs in this process."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastft import nf4
from fastft.bench.harness import Machine, Row, compare_ms, saved_for_backward_bytes


def run(machine: Machine, size: int = 4096, rows_list=(512, 2048), repeats: int = 5, progress=print) -> list[Row]:
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf

    torch.manual_seed(0)
    weight = torch.randn(size, size) / size**0.5
    packed, state = nf4.quantize(weight, blocksize=64, double_quant=True)
    bnb_packed, bnb_state = bnbf.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type="nf4")
    dense = nf4.dequantize(packed, state)
    results = []

    progress(f"dequantize {size}x{size}")
    out = torch.empty(size, size)
    ms = compare_ms({"fastft": lambda: nf4.dequantize(packed, state),
                     "fastft_out": lambda: nf4.dequantize(packed, state, out=out),
                     "bnb": lambda: bnbf.dequantize_4bit(bnb_packed, bnb_state),
                     "fill": lambda: torch.empty(size, size).fill_(1.0)}, repeats=repeats * 3)
    moved = packed.numel() + state.absmax.numel() + size * size * 4  # codes + absmax codes read, fp32 written
    # bitsandbytes' CPU backend has no out= variant: its row is a fresh output in both cases.
    for label, ours in ((f"dequantize {size}x{size} fp32, new output", ms["fastft"]),
                        (f"dequantize {size}x{size} fp32, into out=", ms["fastft_out"])):
        results.append(Row(label, ours, "bitsandbytes", ms["bnb"], machine.copy_ms(moved),
                           ">= 4x bnb, >= 50% of copy bound"))
        results[-1].met = results[-1].speedup >= 4 and results[-1].of_bound >= 0.5
    # What a fresh output costs by itself: the OS maps and zeroes its pages on first write.
    results.append(Row(f"dequantize {size}x{size} fp32, new output", ms["fastft"],
                       "torch.empty + fill_ (a fresh fp32 tensor written once)", ms["fill"], machine.copy_ms(moved)))

    progress("matmul M=1")
    x1 = torch.randn(1, size)
    ms = compare_ms({"fastft": lambda: nf4.matmul(x1, packed, state),
                     "bnb": lambda: bnb.matmul_4bit(x1, bnb_packed.t(), quant_state=bnb_state),
                     "dense": lambda: F.linear(x1, dense)}, repeats=repeats * 5)
    results.append(Row("matmul M=1 fwd", ms["fastft"], "bitsandbytes", ms["bnb"], machine.copy_ms(packed.numel()),
                       ">= 10x bnb"))
    results[-1].met = results[-1].speedup >= 10
    results.append(Row("matmul M=1 fwd", ms["fastft"], "dense fp32", ms["dense"], machine.copy_ms(packed.numel())))

    for rows in rows_list:
        progress(f"matmul M={rows} fwd+bwd")
        x = torch.randn(rows, size, requires_grad=True)
        grad = torch.randn(rows, size)

        def step(fn):
            return lambda: fn().backward(grad)

        flops = 2 * 2 * rows * size * size
        ms = compare_ms({"fastft": step(lambda: nf4.matmul(x, packed, state)),
                         "dense": step(lambda: F.linear(x, dense)),
                         "bnb": step(lambda: bnb.matmul_4bit(x, bnb_packed.t(), quant_state=bnb_state))},
                        repeats=repeats)
        ours, peer_dense, peer_bnb = ms["fastft"], ms["dense"], ms["bnb"]
        saved = {name: saved_for_backward_bytes(fn) for name, fn in (
            ("fastft", lambda: nf4.matmul(x, packed, state)), ("dense", lambda: F.linear(x, dense)),
            ("bnb", lambda: bnb.matmul_4bit(x, bnb_packed.t(), quant_state=bnb_state)))}
        results.append(Row(f"matmul M={rows} fwd+bwd", ours, "dense fp32", peer_dense, machine.gemm_ms(flops),
                           "<= 1.15x dense time", fastft_saved_bytes=saved["fastft"],
                           peer_saved_bytes=saved["dense"]))
        results[-1].met = results[-1].fastft_ms <= 1.15 * peer_dense
        results.append(Row(f"matmul M={rows} fwd+bwd", ours, "bitsandbytes", peer_bnb, machine.gemm_ms(flops),
                           ">= 1.3x bnb", fastft_saved_bytes=saved["fastft"], peer_saved_bytes=saved["bnb"]))
        results[-1].met = results[-1].speedup >= 1.3
    return results
