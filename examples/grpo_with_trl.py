"""GRPO of SmolLM2-135M-Instruct with LoRA through TRL's GRPOTrainer, with fastft.patch(trainer): the fused LoRA
layers and fastft's fused log-probability head in place of TRL's (for the policy, the old-policy and the reference
passes; the reference is the same model with the adapter disabled). The task: small sums, rewarded 1 when the last
number the completion states is the right answer. The prompts are chat messages (TRL applies the model's chat template).

    python examples/grpo_with_trl.py --max-steps 8
    python examples/grpo_with_trl.py --max-steps 8 --without-fastft    # TRL alone, to compare
    python examples/grpo_with_trl.py --tiny --max-steps 2    # a random-init 2-layer model, same tokenizer
"""

import argparse
import random
import re
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import GRPOConfig, GRPOTrainer

import fastft
from fastft.bench.smollm2 import load_smollm2, smollm2_checkpoint


def sums(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        rows.append({"prompt": [{"role": "user", "content": f"What is {a} + {b}? Reply with just the number."}],
                     "answer": a + b})
    return Dataset.from_list(rows)


def correct_sum(completions, answer, **_) -> list[float]:
    """1.0 where the last number of the completion (a chat message) is the answer, else 0.0."""
    rewards = []
    for completion, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+", completion[0]["content"])
        rewards.append(float(bool(numbers) and int(numbers[-1]) == expected))
    return rewards


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, *_, **__):
        self.start = time.perf_counter()

    def on_step_end(self, *_, **__):
        self.times.append(time.perf_counter() - self.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--tiny", action="store_true", help="a random-init 2-layer Llama instead of SmolLM2's weights")
    parser.add_argument("--without-fastft", action="store_true", help="TRL alone (no fastft.patch)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             eos_token_id=tokenizer.eos_token_id))
    else:
        model, tokenizer = load_smollm2()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=8, num_generations=4,
                            max_completion_length=12, max_steps=args.max_steps, learning_rate=5e-5, beta=0.04,
                            logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, bf16=False, seed=0)
        trainer = GRPOTrainer(model=model, reward_funcs=correct_sum, args=config,
                              train_dataset=sums(8 * args.max_steps), processing_class=tokenizer, callbacks=[timer])
        if not args.without_fastft:
            print(fastft.patch(trainer))
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}  reward {entry['reward']:.3f}  "
                  f"kl {entry.get('kl', 0.0):.5f}")
    later = timer.times[1:] or timer.times
    print(f"{len(timer.times)} steps, {sorted(later)[len(later) // 2]:.2f} s a step (median after the first)")


if __name__ == "__main__":
    main()
