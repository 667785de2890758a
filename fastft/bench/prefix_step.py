"""Prefix tuning step (peft PrefixTuning with its projection MLP) on SmolLM2-135M-Instruct: fastft's broadcast
prefix (`fastft.patch(peft_model)`, prompt=True: the prefix and its MLP computed once per step for one row and
expanded over the batch) vs plain peft (the prefix computed for every row), side by side in one process.

Batch 8 x 128 tokens, 30 virtual tokens, encoder_hidden_size 512 (the MLP: 576 -> 512 -> 30 layers x 2 x 192),
fp32 base (frozen), AdamW on the prefix parameters. fused_loss stays off in both, so the difference is the prefix
path alone. Time: median step (forward, backward, AdamW) in interleaved rounds; memory: the bytes autograd saves
for backward in the forward pass (each storage once, parameters left out), where the per-row prefix shows.

    python -m fastft.bench.prefix_step        # prints the row
"""

from __future__ import annotations

import copy

import torch

from fastft.bench.harness import Machine, Row, compare_ms, saved_for_backward_bytes

BATCH, TOKENS, VIRTUAL, ENCODER = 8, 128, 30, 512


def run(machine: Machine, repeats: int = 3, progress=print) -> list[Row]:
    from peft import PrefixTuningConfig, get_peft_model

    import fastft
    from fastft.bench.smollm2 import load_smollm2

    base, _ = load_smollm2()
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=VIRTUAL, prefix_projection=True,
                                encoder_hidden_size=ENCODER)
    torch.manual_seed(0)
    models = {"plain": get_peft_model(copy.deepcopy(base), config)}
    torch.manual_seed(0)
    models["fastft"] = get_peft_model(base, config)
    fastft.patch(models["fastft"])
    ids = torch.randint(0, base.config.vocab_size, (BATCH, TOKENS), generator=torch.Generator().manual_seed(0))
    steps, saved = {}, {}
    for name, model in models.items():
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-4)

        def step(model=model, optimizer=optimizer):
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        steps[name] = step
        saved[name] = saved_for_backward_bytes(lambda model=model: model(input_ids=ids, labels=ids).loss,
                                               exclude=list(model.parameters()))
    progress(f"SmolLM2-135M prefix tuning step ({BATCH} x {TOKENS} tokens, {VIRTUAL} virtual tokens, MLP): "
             "fastft broadcast prefix vs peft")
    ms = compare_ms(steps, repeats=repeats)
    row = Row(f"SmolLM2-135M prefix tuning step (MLP, {VIRTUAL} virtual tokens, batch {BATCH} x {TOKENS}; saved for "
              f"backward {saved['fastft'] / 2**20:.0f} vs {saved['plain'] / 2**20:.0f} MiB = "
              f"{saved['fastft'] / saved['plain']:.2f}x)", ms["fastft"], "plain peft (prefix per row)", ms["plain"],
              target="(no target)", fastft_saved_bytes=saved["fastft"], peer_saved_bytes=saved["plain"])
    return [row]


if __name__ == "__main__":
    from fastft.bench.harness import markdown

    machine = Machine.measure()
    print(markdown(machine, run(machine), "python -m fastft.bench.prefix_step"))
