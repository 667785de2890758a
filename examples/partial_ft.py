"""Partial fine-tuning of SmolLM2-135M-Instruct: the top k decoder layers, the final norm and the head train; the
frozen layers are held in 4-bit NF4 and run without autograd; the loss is fastft's fused cross-entropy; AdamW steps
each parameter inside backward (AdamWInBackward: no gradient outlives its step; --plain-adamw steps after backward).

    python examples/partial_ft.py --top-k 4 --steps 10
"""

import argparse
import time

import torch

import fastft
from fastft.methods.freeze import freeze
from fastft.methods.optim_in_backward import AdamWInBackward

TEXT = ("The quick brown fox jumps over the lazy dog. " * 4 + "Two plus three is five. Seven minus four is three. ") * 8


def load(tiny: bool):
    from fastft.bench.smollm2 import load_smollm2, smollm2_checkpoint

    if not tiny:
        return load_smollm2()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=True)), tokenizer


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-quantize", action="store_true", help="keep the frozen part in fp32")
    parser.add_argument("--plain-adamw", action="store_true", help="torch.optim.AdamW stepped after backward")
    parser.add_argument("--tiny", action="store_true", help="a random 4-layer model (tests), not SmolLM2")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.tiny)
    print(freeze(model, top_k=args.top_k, quantize=not args.no_quantize))
    print(fastft.patch(model, fused_loss=True))
    ids = tokenizer(TEXT, return_tensors="pt")["input_ids"][:, :args.tokens]
    optimizer = (torch.optim.AdamW if args.plain_adamw else AdamWInBackward)(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()  # with AdamWInBackward, the parameters step here
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    return losses


if __name__ == "__main__":
    main()
