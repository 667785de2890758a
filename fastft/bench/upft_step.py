"""UPFT vs full-trace fine-tuning of SmolLM2-135M-Instruct: the training-step time per example on the same prompts
(32 prompt tokens; a 256-token self-generated trace, of which UPFT keeps k = 16), both on fastft's fused loss
(`fastft.patch(model, fused_loss=True)`), full fine-tuning with AdamW. UPFT's cost per example averages its prefix
examples and, at the structure ratio (0.1), its whole-trace examples (batched apart, as group_by_length does).
Batch 8 per step. The fused loss skips rows labelled -100 before the head matmul: at 48 tokens of which 16
labelled, UPFT pays the head for the 16 only.

    python -m fastft.bench.upft_step        # prints the row
"""

from __future__ import annotations

import torch

from fastft.bench.harness import Machine, Row, compare_ms

PROMPT, TRACE, K, STRUCTURE_RATIO, BATCH = 32, 256, 16, 0.1, 8


def run(machine: Machine, repeats: int = 2, progress=print) -> list[Row]:
    import fastft
    from fastft.bench.smollm2 import load_smollm2

    model, _ = load_smollm2()
    fastft.patch(model, fused_loss=True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, PROMPT + TRACE), generator=torch.Generator().manual_seed(0))

    def step(length):
        batch = ids[:, :length]
        labels = batch.clone()
        labels[:, :PROMPT] = -100  # labels on the trace (UPFT: its first K tokens) only

        def run_step():
            model(input_ids=batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run_step

    progress(f"SmolLM2-135M UPFT step ({BATCH} x {PROMPT + K} tokens) vs full-trace step ({BATCH} x {PROMPT + TRACE})")
    times = compare_ms({"upft": step(PROMPT + K), "full": step(PROMPT + TRACE)}, repeats=repeats)
    prefix, full = times["upft"] / BATCH, times["full"] / BATCH
    upft = (1 - STRUCTURE_RATIO) * prefix + STRUCTURE_RATIO * full
    row = Row(f"SmolLM2-135M UPFT step per example (k={K}, structure ratio {STRUCTURE_RATIO}; prefix-only "
              f"examples {prefix / full:.2f}x) vs full {TRACE}-token traces", upft, "full-trace fine-tuning", full,
              target="<= 0.3x time per example")
    row.met = upft <= 0.3 * full
    return [row]


if __name__ == "__main__":
    from fastft.bench.harness import markdown

    machine = Machine.measure()
    print(markdown(machine, run(machine, repeats=2), "python -m fastft.bench.upft_step"))
