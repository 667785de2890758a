"""DPO of SmolLM2-135M-Instruct with LoRA through TRL's DPOTrainer, with fastft.patch(trainer): the fused LoRA
layers and fastft's fused log-probability head in place of TRL's (the reference pass runs the same head with the
adapter disabled). The preference pairs are small sums: the correct answer is chosen, an off-by-some one rejected.

    python examples/dpo_with_trl.py --max-steps 8
    python examples/dpo_with_trl.py --tiny --max-steps 2    # a random-init 2-layer model, same tokenizer
"""

import argparse
import random
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, TrainerCallback
from trl import DPOConfig, DPOTrainer

import fastft
from fastft.bench.smollm2 import load_smollm2, smollm2_checkpoint


def sums(n: int, seed: int = 0) -> Dataset:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        rows.append({"prompt": f"Question: what is {a} + {b}? Answer:", "chosen": f" {a + b}", "rejected": f" {wrong}"})
    return Dataset.from_list(rows)


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
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.tiny:
        tokenizer = AutoTokenizer.from_pretrained(smollm2_checkpoint())
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))
    else:
        model, tokenizer = load_smollm2()
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as output_dir:
        config = DPOConfig(output_dir=output_dir, per_device_train_batch_size=4, max_steps=args.max_steps,
                           learning_rate=5e-4, beta=0.1, logging_steps=1, save_strategy="no", report_to=[],
                           use_cpu=True, bf16=False)
        trainer = DPOTrainer(model=model, args=config, train_dataset=sums(8 * args.max_steps),
                             processing_class=tokenizer, callbacks=[timer])
        print(fastft.patch(trainer))
        trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"step {entry['step']}: loss {entry['loss']:.4f}  reward accuracy "
                  f"{entry['rewards/accuracies']:.2f}  margin {entry['rewards/margins']:.4f}")
    later = timer.times[1:] or timer.times
    print(f"{len(timer.times)} steps, {sorted(later)[len(later) // 2]:.2f} s a step (median after the first)")


if __name__ == "__main__":
    main()
