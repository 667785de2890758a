"""`fastft bench`: side-by-side benchmarks against the peer libraries (CPU figures on CPU machines)."""

from __future__ import annotations

from pathlib import Path

from fastft.bench.harness import Machine, Row, markdown, write_results

SUITES = {
    "quick": "NF4 dequantize and matmul vs bitsandbytes and dense fp32 (4096x4096); one LoRA layer vs peft; "
             "one bottleneck adapter vs plain torch; fake quantization vs torchao; SmolLM2 LoRA generation vs peft (fp32) "
             "and peft + bitsandbytes (4-bit)",
    "lora": "a mini Llama LoRA training step, fp32 and 4-bit base, vs peft (one process per case; minutes)",
    "distill": "fused distillation loss vs plain torch and Liger: time (warm, and first call in fresh processes), "
               "peak memory, growth in tokens and vocab; "
               "the fused causal-LM cross-entropy vs plain torch",
    "qat": "fake quantization (int4 g32 weights, int8 per-token activations) vs torchao; FakeQuantLinear vs "
           "nn.Linear and torchao; a mini Llama QAT step vs torchao",
    "adapters": "bottleneck adapters vs plain torch: one adapter, and a mini Llama training step with Houlsby adapters",
    "distributed": "LoRA and QLoRA training steps of a mini Llama under FSDP2 on 2 CPU processes vs peft "
                   "(+ bitsandbytes): step time, peak RSS per rank, all-gather bytes of a 4-bit vs a bf16 base",
    "methods": "fine-tuning methods on SmolLM2-135M: EWC penalty+gradient vs an Avalanche-style loop, EWC's "
               "overhead in a full fine-tuning step, routed multi-task LoRA vs peft task by task; full and "
               "top-4-layers fine-tuning steps vs plain transformers (peak RSS, time; one process per case); UPFT vs "
               "full-trace fine-tuning step time per example (tens of minutes)",
    "preference": "DPO, GRPO, KTO and ORPO losses from hidden states vs TRL's logits path and Liger (time, peak memory); the "
                  "cross-entropy with 256 of 2048 rows labelled vs all; DPO and SFT steps of SmolLM2-135M with LoRA "
                  "through TRL, fastft vs TRL alone (vs TRL + Liger for DPO), one process per case",
    "cpu-paths": "each C++ kernel with an AVX-512 path on it vs on its AVX2 path (FASTFT_NO_AVX512=1), fresh "
                 "processes alternating (AVX-512 CPUs only)",
}


def run_suite(suite: str = "quick", out_dir: Path = Path("bench/results"), repeats: int = 5,
              command: str = "fastft bench") -> tuple[Machine, list[Row], list[Path]]:
    if suite not in SUITES:
        raise ValueError(f"suite must be one of {sorted(SUITES)}, got {suite!r}")
    from fastft.bench import (adapters, cpu_paths, distillation, distributed, generate, lora, lora_step, methods, nf4,
                              preference, qat)

    print("measuring the machine's copy bandwidth and fp32 GEMM rate ...", flush=True)
    machine = Machine.measure()

    def progress(what):
        print(f"  running {what} ...", flush=True)

    if suite == "quick":
        rows = nf4.run(machine, repeats=repeats, progress=progress)
        rows += lora.run_layer(machine, repeats=repeats, progress=progress)
        rows += adapters.run_layer(machine, repeats=repeats, progress=progress)
        rows += qat.run(machine, repeats=repeats, progress=progress)
        rows += generate.run(machine, repeats=repeats, progress=progress)
    elif suite == "qat":
        rows = qat.run(machine, repeats=repeats, progress=progress)
        rows += qat.run_layer(machine, repeats=repeats, progress=progress)
        rows += qat.run_step(machine, steps=repeats, progress=progress)
    elif suite == "adapters":
        rows = adapters.run_layer(machine, repeats=repeats, progress=progress)
        rows += adapters.run_step(machine, steps=repeats, progress=progress)
    elif suite == "distributed":
        rows = distributed.run(machine, steps=repeats, progress=progress)
    elif suite == "methods":
        from fastft.bench import partial_ft, prefix_step, upft_step

        rows = methods.run(machine, repeats=repeats, progress=progress)
        rows += partial_ft.run(machine, steps=max(1, repeats // 2), rounds=1, progress=progress)
        rows += upft_step.run(machine, repeats=max(1, repeats // 2), progress=progress)
        rows += prefix_step.run(machine, repeats=max(1, repeats // 2), progress=progress)
    elif suite == "preference":
        from fastft.bench import trl_step

        rows = preference.run_ignored_rows(machine, repeats=repeats, progress=progress)
        rows += preference.run_losses(machine, repeats=max(1, repeats // 3), progress=progress)
        rows += trl_step.run(steps=repeats, progress=progress)
    elif suite == "cpu-paths":
        rows = cpu_paths.run(repeats=repeats, progress=progress)
    elif suite == "lora":
        rows = lora.run_group(machine, repeats=max(repeats, 3), progress=progress)
        rows += lora.run_dora(machine, repeats=max(repeats, 3), progress=progress)
        rows += lora_step.run(machine, steps=repeats, progress=progress)
    else:
        rows = distillation.run_time(machine, repeats=repeats, progress=progress)
        rows += distillation.run_fresh(machine, progress=progress)
        rows += distillation.run_cross_entropy(machine, repeats=repeats, progress=progress)
        memory_rows, growth = distillation.run_memory(progress=progress)
        rows += memory_rows
        print("fastft peak MiB above inputs: " + ", ".join(f"{case}: {mib:.0f}" for case, mib in growth.items()))
    paths = write_results(out_dir, suite, machine, rows, command)
    return machine, rows, paths


__all__ = ["SUITES", "Machine", "Row", "markdown", "run_suite"]
