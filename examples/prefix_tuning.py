"""Prompt learning on SmolLM2-135M-Instruct with a 4-bit base: peft's PrefixTuning (with its projection MLP),
PromptTuning or P-tuning, `fastft.patch` for the fused loss and the once-per-step prefix, and (prefix tuning only
with fastft: peft refuses it) gradient checkpointing.

    python examples/prefix_tuning.py --method prefix --checkpointing --steps 10
"""

import argparse
import time

import torch
from peft import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig, get_peft_model

import fastft

TEXT = "Question: what is two plus three? Answer: five. Question: what is seven minus four? Answer: three. " * 4


def load(tiny: bool):
    from fastft.bench.smollm2 import load_smollm2, smollm2_checkpoint

    if not tiny:
        return load_smollm2()
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)), tokenizer


def config(method: str, tokens: int):
    if method == "prefix":
        return PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, prefix_projection=True,
                                  encoder_hidden_size=128)
    if method == "p-tuning":
        return PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens, encoder_hidden_size=128)
    return PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=tokens)


def main(argv=None) -> list[float]:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--method", choices=("prefix", "prompt", "p-tuning"), default="prefix")
    parser.add_argument("--virtual-tokens", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--checkpointing", action="store_true")
    parser.add_argument("--tiny", action="store_true", help="a random 2-layer model (tests), not SmolLM2")
    args = parser.parse_args(argv)

    model, tokenizer = load(args.tiny)
    fastft.quantize_model(model)  # the frozen base in 4-bit NF4
    model = get_peft_model(model, config(args.method, args.virtual_tokens))
    model.print_trainable_parameters()
    print(fastft.patch(model, fused_loss=True))
    if args.checkpointing:  # after get_peft_model, which refuses prefix tuning on a checkpointed model
        model.get_base_model().gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = tokenizer([TEXT] * args.batch, return_tensors="pt")["input_ids"][:, :96]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        print(f"step {step + 1}: loss {loss.item():.4f}")
    print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")
    return losses


if __name__ == "__main__":
    main()
