"""`fastft bench --suite gpu` (run by bench/gpu_check.sh): the Triton kernels on a CUDA GPU against the peers, with
time (median of CUDA-event-timed runs after warm-up), TFLOP/s or GB/s against the device's measured peak (a large
bf16 torch.matmul and a device-to-device copy, measured first in the same run) and peak memory
(torch.cuda.max_memory_allocated). Writes gpu.json and gpu.md like the CPU suites. Never run without a GPU: it
refuses, so no figure here is ever a CPU figure.

Shapes: Llama-8B's MLP projection (4096 tokens x 4096 -> 14336) for NF4 / fake quantization / LoRA (the op and a
whole peft layer), its causal-LM loss (hidden 4096, V = 128256) and the distillation JSD over 512 rows of that
vocabulary. Peers: bitsandbytes, torchao, peft, Liger and plain torch; one that is not installed (or fails) is
reported as such.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

T, H, I, R = 4096, 4096, 14336, 16


def _ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def measure_device() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _ms(lambda: a @ a, repeats=10)
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    copy_ms = _ms(lambda: dst.copy_(src), repeats=10)
    return {"gpu": torch.cuda.get_device_name(), "bf16_tflops": 2 * 8192 ** 3 / ms / 1e9,
            "copy_gbps": 2 * src.numel() / copy_ms / 1e6}


def _cases():
    """(name, flops, bytes, fastft fn, {peer name: fn})."""
    from fastft import nf4
    from fastft.ops import lora as lora_ops

    bf16 = torch.bfloat16
    x = torch.randn(T, H, device="cuda", dtype=bf16)
    weight = torch.randn(I, H, device="cuda", dtype=bf16) / 64
    packed, state = nf4.quantize(weight, 64, True)
    flops = 2 * T * H * I
    nbytes = T * H * 2 + T * I * 2 + I * H // 2
    peers = {"torch bf16 dense": lambda: x @ weight.t()}
    try:
        import bitsandbytes as bnb

        qweight, qstate = bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=True)
        peers["bitsandbytes matmul_4bit"] = lambda: bnb.matmul_4bit(x, qweight.t(), quant_state=qstate)
    except Exception as error:  # noqa: BLE001 - a missing peer is reported, not fatal
        peers[f"bitsandbytes ({type(error).__name__})"] = None
    try:
        from torchao.quantization import to_nf4
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4

        ao_weight = to_nf4(weight, 64, 256)
        peers["torchao linear_nf4"] = lambda: linear_nf4(x, ao_weight)
    except Exception as error:  # noqa: BLE001
        peers[f"torchao ({type(error).__name__})"] = None
    yield "nf4 linear fwd 4096x4096->14336", flops, nbytes, lambda: nf4.matmul(x, packed, state), peers

    xg = x.detach().requires_grad_()
    a = (torch.randn(R, H, device="cuda") * 0.01).requires_grad_()
    b = torch.zeros(I, R, device="cuda").requires_grad_()
    dy = torch.randn(T, I, device="cuda")

    def fused():
        deltas, _ = lora_ops.lora_deltas(xg, [a], [b], [2.0], 0.1, [1], [], [False])
        torch.autograd.grad(deltas, [xg, a, b], [dy])

    def plain():
        dropped = torch.nn.functional.dropout(xg.float(), 0.1)
        delta = (dropped @ a.t()) @ b.t() * 2.0
        torch.autograd.grad(delta, [xg, a, b], dy)

    yield ("lora r=16 fp32 adapters fwd+bwd (bf16 x)", 6 * T * H * R + 6 * T * I * R, T * H * 2 * 3 + T * I * 4 * 2,
           fused, {"peft-style torch": plain})
    yield from _peft_lora_case(x, weight, dy.to(bf16))
    yield from _cross_entropy_case()

    from fastft.kernels import qat

    w16 = weight.clone()
    ops = qat.FakeQuantOperands(x, w16, 32, (-128, 127), (-8, 7), 1e-6)
    peers = {"torch bf16 dense": lambda: x @ w16.t()}
    yield "fake-quant linear fwd (int8 x, int4 g32 W)", flops, T * H * 2 + I * H * 2 + T * I * 2, \
        lambda: qat.fake_quant_matmul(ops, None), peers

    from fastft.kernels import distillation

    V, rows = 128256, 512
    zs, zt = torch.randn(rows, V, device="cuda"), torch.randn(rows, V, device="cuda")
    yield ("distillation JSD rows=512 V=128256", 0, rows * V * 4 * 7,
           lambda: distillation.distill_soft_rows(zs.clone(), zt, 2.0, 0.5, 1.0, True),
           {"torch log_softmax JSD": lambda: _torch_jsd(zs, zt)})


def _peft_lora_case(x, weight, dy):
    """A whole peft LoRA layer (bf16 base, fp32 adapters as peft makes them, dropout 0.1), fwd+bwd: fastft.patch of
    the peft model vs the peft model itself."""
    import copy

    import fastft

    try:
        from peft import LoraConfig, get_peft_model
    except Exception as error:  # noqa: BLE001
        yield "peft lora layer r=16 fwd+bwd", 0, 0, None, {f"peft ({type(error).__name__})": None}
        return
    base = torch.nn.Sequential()
    base.add_module("proj", torch.nn.Linear(H, I, bias=False, device="cuda", dtype=torch.bfloat16))
    with torch.no_grad():
        base.proj.weight.copy_(weight)
    model = get_peft_model(base, LoraConfig(r=R, lora_alpha=2 * R, lora_dropout=0.1, target_modules=["proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.01)
    patched = copy.deepcopy(model)
    fastft.patch(patched)
    xg = x.detach().requires_grad_()

    def step(m):
        return lambda: torch.autograd.backward(m(xg), dy)

    yield (f"peft lora layer r={R} fwd+bwd (bf16 base, fp32 adapters)", 6 * T * H * I + 6 * T * (H + I) * R,
           T * H * 2 * 3 + T * I * 2 * 2 + I * H * 2, step(patched), {"peft": step(model)})


def _cross_entropy_case():
    """Causal-LM loss over Llama-3's vocabulary, fwd+bwd (hidden and head weight get gradients), bf16: fastft's
    fused loss vs Liger's fused linear cross-entropy vs logits + F.cross_entropy."""
    from fastft.losses import fused_linear_cross_entropy

    V = 128256
    hidden = (torch.randn(T, H, device="cuda", dtype=torch.bfloat16)).requires_grad_()
    head = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) / 64).requires_grad_()
    labels = torch.randint(0, V, (T,), device="cuda")

    def backward_of(loss_fn):
        return lambda: torch.autograd.grad(loss_fn(), [hidden, head])

    peers = {"torch logits + cross_entropy": backward_of(
        lambda: torch.nn.functional.cross_entropy((hidden @ head.t()).float(), labels))}
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        peers["liger fused linear CE"] = backward_of(lambda: liger(head, hidden, labels))
    except Exception as error:  # noqa: BLE001
        peers[f"liger ({type(error).__name__})"] = None
    yield (f"causal-LM loss fwd+bwd T={T} H={H} V={V} bf16", 6 * T * H * V, T * H * 2 * 2 + V * H * 2 * 2,
           backward_of(lambda: fused_linear_cross_entropy(hidden, head, labels)), peers)


def _torch_jsd(zs, zt, beta=0.5, t=2.0):
    s, q = torch.log_softmax(zs / t, -1), torch.log_softmax(zt / t, -1)
    m = torch.logaddexp(s + torch.log(torch.tensor(1 - beta)), q + torch.log(torch.tensor(beta)))
    return beta * (q.exp() * (q - m)).sum(-1) + (1 - beta) * (s.exp() * (s - m)).sum(-1)


def run(out_dir: Path) -> list[dict]:
    if not torch.cuda.is_available():
        raise SystemExit("the gpu suite needs a CUDA GPU")
    device = measure_device()
    print(f"{device['gpu']}: measured {device['bf16_tflops']:.0f} TFLOP/s bf16 matmul, {device['copy_gbps']:.0f} GB/s",
          flush=True)
    rows = []
    for name, flops, nbytes, ours, peers in _cases():
        row = {"case": name}
        try:
            if ours is None:
                raise RuntimeError("not run: a library it needs is missing")
            ms = _ms(ours)
            row.update(ms=ms, tflops=flops / ms / 1e9 if flops else None, gbps=nbytes / ms / 1e6,
                       of_peak=(flops / ms / 1e9) / device["bf16_tflops"] if flops else nbytes / ms / 1e6
                       / device["copy_gbps"], peak_mib=_peak_mib(ours))
        except Exception as error:  # noqa: BLE001 - reported in the table
            row["error"] = f"{type(error).__name__}: {error}"[:300]
        for peer, fn in peers.items():
            if fn is None:
                row.setdefault("peers", {})[peer] = None
                continue
            try:
                row.setdefault("peers", {})[peer] = {"ms": _ms(fn), "peak_mib": _peak_mib(fn)}
            except Exception as error:  # noqa: BLE001
                row.setdefault("peers", {})[peer] = {"error": f"{type(error).__name__}: {error}"[:300]}
        print(json.dumps(row), flush=True)
        rows.append(row)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps({"device": device, "torch": torch.__version__, "rows": rows},
                                                 indent=2))
    lines = [f"GPU results ({device['gpu']}, torch {torch.__version__}): measured peak {device['bf16_tflops']:.0f} "
             f"TFLOP/s bf16, copy {device['copy_gbps']:.0f} GB/s.", "",
             "| case | fastft ms | TFLOP/s | GB/s | of peak | peak MiB | peers (ms, peak MiB) |", "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        peers = "; ".join(f"{k}: " + ("not installed" if v is None else v.get("error") or f"{v['ms']:.3f} ms, "
                                      f"{v['peak_mib']:.0f} MiB") for k, v in r.get("peers", {}).items())
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error']} | | | | | {peers} |")
        else:
            lines.append(f"| {r['case']} | {r['ms']:.3f} | {r['tflops'] or 0:.0f} | {r['gbps']:.0f} | "
                         f"{100 * r['of_peak']:.0f}% | {r['peak_mib']:.0f} | {peers} |")
    (out_dir / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return rows


if __name__ == "__main__":
    import sys

    run(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results"))
