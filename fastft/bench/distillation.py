"""Distillation loss benchmarks: fastft's fused linear loss vs plain torch (logits + log_softmax + kl_div, TRL's
formula) and Liger's LigerFusedLinearJSDLoss (eager), JSD beta=0.5, fp32, H=1024. Time side by side in one
process; peak memory above the inputs in one process per case (allocations >= 1 MiB are mmapped, so the peak
RSS follows live tensors).

    python -m fastft.bench.distillation --impl fastft --tokens 2048 --vocab 32000 [--frozen]   # one memory case
    python -m fastft.bench.distillation --impl plain --first-call-time                          # one fresh timing
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

from fastft.bench.harness import Machine, Row, compare_ms, peak_rss_above_now_mib

IMPLS = ("fastft", "plain", "liger")


def _inputs(tokens: int, vocab: int, frozen: bool, hidden: int = 1024):
    generator = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(tokens, hidden, generator=generator, requires_grad=True)
    student_weight = (torch.randn(vocab, hidden, generator=generator) / hidden**0.5).requires_grad_(not frozen)
    teacher_hidden = torch.randn(tokens, hidden, generator=generator)
    teacher_weight = torch.randn(vocab, hidden, generator=generator) / hidden**0.5
    labels = torch.randint(0, vocab, (tokens,), generator=generator)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def _loss_fn(impl: str):
    if impl == "fastft":
        from fastft.losses import fused_linear_distillation

        return lambda *args: fused_linear_distillation(*args, beta=0.5)
    if impl == "plain":
        from fastft.reference.distillation import distillation_ref

        return lambda *args: distillation_ref(*args, beta=0.5)
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.5, compiled=False)
    return lambda *args: liger(*args)


def _available(impl: str) -> bool:
    if impl != "liger":
        return True
    try:
        import liger_kernel.chunked_loss  # noqa: F401
    except ImportError:
        return False
    return True


def run_time(machine: Machine, tokens: int = 2048, vocab: int = 32000, repeats: int = 2, progress=print):
    rows = []
    impls = [impl for impl in IMPLS if _available(impl)]
    for frozen in (False, True):
        progress(f"distillation loss fwd+bwd, {tokens} tokens, V={vocab}, {'frozen' if frozen else 'trainable'} head")
        args = _inputs(tokens, vocab, frozen)
        ms = compare_ms({impl: (lambda fn=_loss_fn(impl): fn(*args).backward()) for impl in impls}, repeats=repeats)
        gemms = (3 if frozen else 4) * 2 * tokens * 1024 * vocab
        for peer in impls[1:]:
            target = "<= 0.8x plain time" if peer == "plain" else "faster than Liger"
            row = Row(f"distillation fwd+bwd, {'frozen' if frozen else 'trainable'} head", ms["fastft"],
                      "plain torch" if peer == "plain" else "Liger (eager)", ms[peer], machine.gemm_ms(gemms), target)
            row.met = row.fastft_ms <= 0.8 * ms[peer] if peer == "plain" else row.speedup > 1
            rows.append(row)
    return rows


def peak_mib(impl: str, tokens: int, vocab: int, frozen: bool) -> float:
    """Peak RSS above the inputs of one loss fwd+bwd, in a fresh process."""
    command = [sys.executable, "-m", "fastft.bench.distillation", "--impl", impl, "--tokens", str(tokens),
               "--vocab", str(vocab)] + (["--frozen"] if frozen else [])
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
    output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
    return json.loads(output.strip().splitlines()[-1])["peak_mib"]


def first_call_s(impl: str, tokens: int, vocab: int, frozen: bool) -> float:
    """Seconds of the first loss fwd+bwd in a fresh process (after importing torch._dynamo, which a transformers
    script has loaded by then and which torch imports on the first call of any torch.library custom op, ~1.3 s)."""
    command = [sys.executable, "-m", "fastft.bench.distillation", "--impl", impl, "--tokens", str(tokens),
               "--vocab", str(vocab), "--first-call-time"] + (["--frozen"] if frozen else [])
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])["first_call_s"]


def run_fresh(machine: Machine, tokens: int = 2048, vocab: int = 32000, repeats: int = 2,
              progress=print) -> list[Row]:
    """fastft vs plain torch, each timed on its first call in fresh processes (best of `repeats`, alternating)."""
    rows = []
    for frozen in (False, True):
        head = "frozen" if frozen else "trainable"
        progress(f"distillation fwd+bwd, first call in a fresh process, {head} head ({2 * repeats} processes)")
        times = {"fastft": [], "plain": []}
        for _ in range(repeats):
            for impl in times:
                times[impl].append(first_call_s(impl, tokens, vocab, frozen) * 1e3)
        gemms = (3 if frozen else 4) * 2 * tokens * 1024 * vocab
        row = Row(f"distillation fwd+bwd, {head} head, first call in a fresh process", min(times["fastft"]),
                  "plain torch", min(times["plain"]), machine.gemm_ms(gemms), "<= plain time")
        row.met = row.fastft_ms <= row.peer_ms
        rows.append(row)
    return rows


def run_memory(progress=print) -> tuple[list[Row], dict]:
    rows, growth = [], {}
    impls = [impl for impl in IMPLS if _available(impl)]
    for frozen in (False, True):
        head = "frozen" if frozen else "trainable"
        progress(f"distillation peak memory, 2048 tokens, V=32000, {head} head (one process per case)")
        peaks = {impl: peak_mib(impl, 2048, 32000, frozen) for impl in impls}
        for peer in impls[1:]:
            target = "<= 0.15x plain" if peer == "plain" else "below Liger"
            row = Row(f"distillation peak MiB above inputs, {head} head (value in the ms columns)", peaks["fastft"],
                      "plain torch" if peer == "plain" else "Liger (eager)", peaks[peer], target=target)
            row.met = peaks["fastft"] <= 0.15 * peaks[peer] if peer == "plain" else peaks["fastft"] < peaks[peer]
            rows.append(row)
    for tokens, vocab in ((2048, 32000), (8192, 32000), (16384, 32000), (2048, 128000)):
        progress(f"fastft distillation peak memory, {tokens} tokens, V={vocab}")
        growth[f"{tokens} tokens, V={vocab}"] = peak_mib("fastft", tokens, vocab, False)
    return rows, growth


def run_cross_entropy(machine: Machine, tokens: int = 2048, vocab: int = 32000, repeats: int = 2,
                      progress=print) -> list[Row]:
    """A causal LM's loss alone: fastft.losses.fused_linear_cross_entropy vs logits + F.cross_entropy (what
    transformers computes), fp32, H=1024, fwd+bwd, trainable and frozen head; time and bytes saved for backward.
    (Liger's fused linear cross-entropy is a Triton kernel: no CPU path to compare with.)"""
    import torch.nn.functional as F

    from fastft.bench.harness import saved_for_backward_bytes
    from fastft.losses import fused_linear_cross_entropy

    rows = []
    for frozen in (False, True):
        head = "frozen" if frozen else "trainable"
        progress(f"cross-entropy fwd+bwd, {tokens} tokens, V={vocab}, {head} head")
        hidden, weight, _, _, labels = _inputs(tokens, vocab, frozen)
        losses = {"fastft": lambda: fused_linear_cross_entropy(hidden, weight, labels),
                  "plain": lambda: F.cross_entropy(F.linear(hidden, weight).float(), labels)}
        ms = compare_ms({name: (lambda fn=fn: fn().backward()) for name, fn in losses.items()}, repeats=repeats)
        saved = {name: saved_for_backward_bytes(fn, exclude=[hidden, weight]) for name, fn in losses.items()}
        gemms = (2 if frozen else 3) * 2 * tokens * 1024 * vocab
        rows.append(Row(f"causal LM cross-entropy fwd+bwd, {head} head", ms["fastft"], "plain torch (logits + "
                        "F.cross_entropy)", ms["plain"], machine.gemm_ms(gemms), fastft_saved_bytes=saved["fastft"],
                        peer_saved_bytes=saved["plain"]))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--frozen", action="store_true")
    parser.add_argument("--first-call-time", action="store_true", help="time the first call instead of its memory")
    args = parser.parse_args(argv)
    loss_fn = _loss_fn(args.impl)
    inputs = _inputs(args.tokens, args.vocab, args.frozen)
    if args.first_call_time:
        import time

        import torch._dynamo  # noqa: F401  (see first_call_s)

        start = time.perf_counter()
        loss_fn(*inputs).backward()
        print(json.dumps({"first_call_s": time.perf_counter() - start}))
        return 0
    peak = peak_rss_above_now_mib(lambda: loss_fn(*inputs).backward())
    print(json.dumps({"peak_mib": peak}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
