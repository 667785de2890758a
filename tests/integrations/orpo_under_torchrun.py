"""Run by tests/integrations/test_trl_distributed.py under torchrun (1 or 2 processes): TRL's ORPOTrainer (or
CPOTrainer) with fastft.patch(trainer) trains a LoRA tiny Llama for 3 steps on the same global batch of 2 pairs
(1 pair per rank under DDP, gloo); each rank writes its trained weights and logged losses."""

import sys

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

import fastft
from trl_fixtures import WORDS, tiny_llama, tokenizer

TRAINERS = {"orpo": (ORPOTrainer, ORPOConfig, {"beta": 0.3}), "cpo": (CPOTrainer, CPOConfig, {"beta": 0.2})}


def pairs() -> Dataset:
    """2 pairs whose prompts and answers have equal token counts, so a per-rank token mean equals the global one."""
    g = torch.Generator().manual_seed(0)
    words = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))  # noqa: E731
    return Dataset.from_list([{"prompt": words(5) + " ", "chosen": words(4), "rejected": words(4)} for _ in range(2)])


def main(kind: str, out: str) -> None:
    torch.set_num_threads(1)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else int(
        __import__("os").environ.get("WORLD_SIZE", "1"))
    trainer_class, config_class, options = TRAINERS[kind]
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                     lora_dropout=0.0, init_lora_weights=False))
    args = config_class(output_dir=out, per_device_train_batch_size=2 // world, max_steps=3, learning_rate=1e-3,
                        max_length=32, report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0,
                        ddp_backend="gloo", logging_steps=1, dataloader_num_workers=0, **options)
    trainer = trainer_class(model=model, args=args, train_dataset=pairs(), processing_class=tokenizer())
    report = fastft.patch(trainer)
    assert report.fused_heads == 1, str(report)
    trainer.train()
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    torch.save({"weights": weights, "losses": losses}, f"{out}/{kind}-world{world}-rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
