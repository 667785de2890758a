"""Full and partial (top-4-layers) fine-tuning steps of SmolLM2-135M-Instruct (30 layers, vocab 49152; batch
2 x 256 tokens, all labelled, AdamW), fastft vs plain transformers, each case in its own process:

- full: every parameter trains. fastft: `fastft.patch(model, fused_loss=True)` (the loss from the hidden states,
  no (tokens, 49152) logits). Plain transformers: the model as loaded.
- top4: layers 26..29, the final norm and the (untied) head train. fastft: `freeze(model, top_k=4, quantize=True)`
  (the frozen linear layers in 4-bit NF4, the bottom run under torch.no_grad) + the fused loss. Plain
  transformers: the same parameters trainable (the head untied the same way), the rest fp32 with requires_grad off.

Plain transformers steps torch.optim.AdamW after backward; fastft steps the same AdamW per parameter inside backward
(fastft.methods.optim_in_backward.AdamWInBackward: no gradient is kept past its parameter's step, no clipping).

The weights are copied out of the checkpoint's memory map after loading (file pages of weights that fastft
replaced by 4-bit copies would otherwise stay resident while the map lives). Peak RSS is the process's high-water
mark during the training steps (reset after loading the model, so the transient of loading and quantizing the fp32
checkpoint does not count); the JSON line also gives the high-water mark of each stage (forward, backward,
optimizer step) and the resident set after loading and between steps (weights, AdamW's state, the process's own).
Time is the median step after a warm-up.

    python -m fastft.bench.partial_ft --case top4 --variant fastft   # one case, prints a JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from fastft.bench.harness import Machine, Row

CASES = ("full", "top4")
VARIANTS = ("transformers", "fastft")


def _status_mib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _vm_hwm_mib() -> float:
    return _status_mib("VmHWM")


def _vm_rss_mib() -> float:
    return _status_mib("VmRSS")


def setup(case: str, variant: str):
    """The model of one case, ready to train."""
    import fastft
    from fastft.bench.smollm2 import load_smollm2
    from fastft.methods.freeze import freeze

    model, _ = load_smollm2()
    with torch.no_grad():  # private copies of the weights, which transformers leaves on the checkpoint's mmap
        for param in model.parameters():
            param.data = param.data.clone()
    if case == "top4":
        if variant == "fastft":
            freeze(model, top_k=4, quantize=True)
        else:
            model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
            model.config.tie_word_embeddings = False
            top = {f"model.layers.{i}." for i in range(26, 30)} | {"model.norm.", "lm_head."}
            for name, param in model.named_parameters():
                param.requires_grad_(name.startswith(tuple(top)))
    if variant == "fastft":
        fastft.patch(model, fused_loss=True)
    return model.train()


def run_case(case: str, variant: str, steps: int, tokens: int = 256, batch: int = 2) -> dict:
    from fastft.methods.optim_in_backward import AdamWInBackward

    model = setup(case, variant)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = (AdamWInBackward if variant == "fastft" else torch.optim.AdamW)(trainable, lr=1e-5)
    ids = torch.randint(0, model.config.vocab_size, (batch, tokens), generator=torch.Generator().manual_seed(0))
    times, stages = [], {}

    def stage(name):  # the high-water mark since the last stage, then a fresh mark from the current RSS
        stages[name] = max(stages.get(name, 0.0), _vm_hwm_mib())
        Path("/proc/self/clear_refs").write_text("5")

    stages["model loaded"] = _vm_rss_mib()  # the transient of loading and quantizing does not count
    Path("/proc/self/clear_refs").write_text("5")
    for step in range(steps + 1):  # the first step warms up (and allocates AdamW's state)
        start = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        stage("forward")
        loss.backward()
        del loss
        stage("backward")
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        stage("optimizer step")
        if step:
            times.append(time.perf_counter() - start)
    return {"step_ms": sorted(times)[len(times) // 2] * 1e3,
            "peak_rss_mib": max(v for k, v in stages.items() if k != "model loaded"), "stages_rss_mib": stages,
            "resting_rss_mib": _vm_rss_mib(), "trainable": sum(p.numel() for p in trainable)}


def run(machine: Machine, steps: int = 2, rounds: int = 2, progress=print) -> list[Row]:
    """Each case in its own process, the variants taking turns for `rounds` rounds; a case's time is its best
    round, its peak RSS the largest."""
    measured = {}
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed large tensors leave the resident set at once
    for case in CASES:
        for round_ in range(rounds):
            for variant in VARIANTS:
                progress(f"SmolLM2-135M {case} fine-tuning step, {variant}, round {round_ + 1} (own process)")
                command = [sys.executable, "-m", "fastft.bench.partial_ft", "--case", case, "--variant", variant,
                           "--steps", str(steps)]
                output = subprocess.run(command, check=True, capture_output=True, text=True, env=env).stdout
                result = json.loads(output.strip().splitlines()[-1])
                best = measured.setdefault((case, variant), result)
                best["step_ms"] = min(best["step_ms"], result["step_ms"])
                best["peak_rss_mib"] = max(best["peak_rss_mib"], result["peak_rss_mib"])
    rows = []
    for case in CASES:
        ours, theirs = measured[case, "fastft"], measured[case, "transformers"]
        what = ("full fine-tuning" if case == "full" else "top-4-layers fine-tuning (fastft: 4-bit frozen part)"
                ) + " (fastft: AdamW in backward)"
        row = Row(f"SmolLM2-135M {what} step, 2x256 tokens ({ours['trainable'] / 1e6:.1f}M trainable; peak RSS "
                  f"{ours['peak_rss_mib']:.0f} vs {theirs['peak_rss_mib']:.0f} MiB = "
                  f"{ours['peak_rss_mib'] / theirs['peak_rss_mib']:.2f}x)", ours["step_ms"], "plain transformers",
                  theirs["step_ms"], target="peak RSS <= 0.7x, time <= 1.0x")
        row.met = ours["peak_rss_mib"] <= 0.7 * theirs["peak_rss_mib"] and row.speedup >= 1.0
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--case", choices=CASES, required=True)
    parser.add_argument("--variant", choices=VARIANTS, required=True)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=256)
    args = parser.parse_args(argv)
    print(json.dumps(run_case(args.case, args.variant, args.steps, args.tokens)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
