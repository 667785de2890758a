"""Run by tests/integrations/test_distributed.py under torchrun (2 processes): HF Trainer trains a fastft-patched peft model with
DDP (gloo), saves the adapter from rank 0, and each rank writes its trained weights and the fastft ops it ran."""

import sys

import torch
from torch.utils.data import Dataset
from transformers import Trainer, TrainingArguments

import test_distributed as t


class Batches(Dataset):
    def __len__(self):
        return 4 * t.WORLD * 2

    def __getitem__(self, index):
        ids = t.global_batch(index // (2 * t.WORLD))[index % (2 * t.WORLD)]
        return {"input_ids": ids, "labels": ids}


def main(out: str) -> None:
    torch.set_num_threads(1)
    model = t.model_for("lora-fused-loss")
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-2,
                             save_strategy="no", report_to=[], use_cpu=True, ddp_backend="gloo",
                             dataloader_num_workers=0, seed=0, logging_steps=1)
    trainer = Trainer(model=model, args=args, train_dataset=Batches())
    result = {}
    ops = t.fastft_ops_run(lambda: result.update(steps=trainer.train().global_step))
    trainer.save_model(f"{out}/adapter")
    rank = torch.distributed.get_rank()
    torch.save({"steps": result["steps"], "ops": ops, "weights": t.trained_weights(model)}, f"{out}/rank{rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
