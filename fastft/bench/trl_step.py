"""Whole training steps of SmolLM2-135M-Instruct (fp32, LoRA r=16 on q/k/v/o) through TRL 1.16, CPU, one process
per case: DPO (2 pairs a step, ~120-token prompts, ~40-token completions) with fastft (fastft.patch(trainer): fused
LoRA layers and fastft's fused head in place of TRL's), TRL alone (its own fused head) and TRL with
use_liger_kernel=True (GPU only: Liger's model kernels are Triton); SFT (4 sequences a step, same lengths, loss on the completion) with fastft and TRL alone.
Reported: median step time after the first step, and the process's peak RSS.

    python -m fastft.bench.trl_step --trainer dpo --impl fastft --steps 4
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from fastft.bench.harness import Row

# TRL's use_liger_kernel=True swaps the model's RMSNorm / SwiGLU / RoPE for Liger's Triton kernels, which need a GPU
# driver: on a CPU it fails ("0 active drivers"), so that case runs only where CUDA is available.
CASES = {"dpo": ("fastft", "trl", "trl+liger"), "sft": ("fastft", "trl")}


def _dataset(tokenizer, n: int, seed: int = 0):
    import torch
    from datasets import Dataset

    g = torch.Generator().manual_seed(seed)
    # sorted: the tokenizer's vocabulary dict comes in a different order in every process
    words = sorted(w for w in tokenizer.get_vocab() if w.isalpha() and len(w) > 3)[:4000]

    def text(count):
        return " ".join(words[int(i)] for i in torch.randint(0, len(words), (count,), generator=g))

    return Dataset.from_list([{"prompt": text(60) + " ", "chosen": text(20), "rejected": text(20), "completion": text(20)}
                              for _ in range(n)])


def run_case(trainer_kind: str, impl: str, steps: int) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import TrainerCallback

    import fastft
    from fastft.bench.smollm2 import load_smollm2

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    common = dict(output_dir="/tmp/fastft-bench-trl", report_to=[], use_cpu=True, max_steps=steps + 1,
                  logging_steps=1, save_strategy="no", bf16=False, dataloader_num_workers=0,
                  use_liger_kernel=impl == "trl+liger", max_length=256, learning_rate=1e-4)
    data = _dataset(tokenizer, 4 * (steps + 1))
    if trainer_kind == "dpo":
        from trl import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model=model, args=DPOConfig(**common, per_device_train_batch_size=2),
                             train_dataset=data.select_columns(["prompt", "chosen", "rejected"]),
                             processing_class=tokenizer)
    else:
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common, per_device_train_batch_size=4),
                             train_dataset=data.select_columns(["prompt", "completion"]), processing_class=tokenizer)
    report = str(fastft.patch(trainer)) if impl == "fastft" else ""

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer.add_callback(Timer())
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"step_s": statistics.median(times[1:]), "peak_rss_mib": peak, "losses": losses,
            "fused_heads": report.count("fastft::fused_linear_logprobs")}


def measure(trainer_kind: str, impl: str, steps: int) -> dict:
    command = [sys.executable, "-m", "fastft.bench.trl_step", "--trainer", trainer_kind, "--impl", impl,
               "--steps", str(steps)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run(steps: int = 4, progress=print) -> list[Row]:
    rows = []
    import torch

    for kind, impls in CASES.items():
        impls = tuple(i for i in impls if i != "trl+liger" or torch.cuda.is_available())
        results = {}
        for impl in impls:
            progress(f"{kind} step of SmolLM2-135M with LoRA through TRL: {impl} (own process)")
            results[impl] = measure(kind, impl, steps)
            progress(f"  -> {results[impl]}")
        ours = results["fastft"]
        for peer in impls[1:]:
            name = "TRL alone (its fused head)" if peer == "trl" else "TRL + use_liger_kernel"
            row = Row(f"{kind} step, SmolLM2-135M LoRA (s as ms columns x1000)", ours["step_s"] * 1e3, name,
                      results[peer]["step_s"] * 1e3, target="faster")
            row.met = ours["step_s"] < results[peer]["step_s"]
            rows.append(row)
            target = 0.8 if kind == "dpo" else 0.85
            row = Row(f"{kind} step peak RSS MiB (value in the ms columns)", ours["peak_rss_mib"], name,
                      results[peer]["peak_rss_mib"], target=f"<= {target}x")
            row.met = ours["peak_rss_mib"] <= target * results[peer]["peak_rss_mib"]
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trainer", choices=tuple(CASES), required=True)
    parser.add_argument("--impl", choices=("fastft", "trl", "trl+liger"), required=True)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args(argv)
    print(json.dumps(run_case(args.trainer, args.impl, args.steps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
