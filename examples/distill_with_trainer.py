"""Distill a small causal LM from a larger one with transformers' Trainer and fastft's fused loss.

The loss reads both models' last hidden states and lm_head weights; no [tokens, vocab] logits are built.
Models here are random-init Llamas from small configs (no downloads); swap in AutoModelForCausalLM.from_pretrained
for real ones (same vocabulary).

    python examples/distill_with_trainer.py --max-steps 20
"""

import argparse
import tempfile

import torch
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from fastft.integrations.distillation import DistillationTrainer


class RandomTokens(Dataset):
    def __init__(self, vocab: int, length: int, size: int):
        self.vocab, self.length, self.size = vocab, length, size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        ids = torch.randint(0, self.vocab, (self.length,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def llama(hidden: int, layers: int, vocab: int) -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--vocab", type=int, default=32000)
    args = parser.parse_args()
    torch.manual_seed(0)
    teacher, student = llama(256, 4, args.vocab), llama(128, 2, args.vocab)
    with tempfile.TemporaryDirectory() as output_dir:
        training = TrainingArguments(output_dir=output_dir, per_device_train_batch_size=4, max_steps=args.max_steps,
                                     learning_rate=1e-3, logging_steps=5, save_strategy="no", report_to=[],
                                     use_cpu=True)
        trainer = DistillationTrainer(model=student, teacher=teacher, args=training,
                                      train_dataset=RandomTokens(args.vocab, 128, 256),
                                      beta=0.5, temperature=2.0, alpha=0.5, scale_by_t2=True)
        result = trainer.train()
    print(f"final training loss {result.training_loss:.4f} after {result.global_step} steps")


if __name__ == "__main__":
    main()
