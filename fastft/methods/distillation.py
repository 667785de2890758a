"""Distilling a transformers causal LM from a teacher with fastft's fused loss: the student's and teacher's last
hidden states go to the loss together with their lm_head weights, so no [tokens, vocab] logits are built.

    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=data,
                                  beta=0.5, temperature=2.0, alpha=0.5)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from transformers import Trainer

from fastft.integrations.heads import gather_in_backward, head_weight
from fastft.losses import check_options, fused_linear_distillation


def _last_hidden_and_head(model: nn.Module, inputs: dict) -> tuple[Tensor, nn.Module, Tensor, Tensor | None]:
    """The last hidden states of `model` (run through its wrapper: DDP's forward syncs gradients), the unwrapped
    model's head and the head's weight and bias."""
    batch = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch")}
    outputs = model(**batch, output_hidden_states=True, logits_to_keep=1)
    while isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    head = model.get_output_embeddings()
    return outputs.hidden_states[-1], head, *head_weight(head)


def distillation_loss(student: nn.Module, teacher: nn.Module, inputs: dict, *, beta: float = 0.0,
                      temperature: float = 1.0, alpha: float = 1.0, scale_by_t2: bool = False,
                      ignore_index: int = -100, num_items_in_batch=None) -> Tensor:
    """Causal-LM distillation loss of one batch: position t predicts token t + 1 (labels shifted as in
    transformers), computed from hidden states with fastft's fused loss."""
    student_hidden, student_head, student_weight, student_bias = _last_hidden_and_head(student, inputs)
    with torch.no_grad():
        teacher_hidden, _, teacher_weight, teacher_bias = _last_hidden_and_head(teacher, inputs)
    labels = inputs.get("labels")
    if labels is None:
        labels = inputs["input_ids"]
    shifted = labels[..., 1:].contiguous()
    loss = fused_linear_distillation(
        student_hidden[..., :-1, :], student_weight, teacher_hidden[..., :-1, :], teacher_weight, shifted,
        student_bias=student_bias, teacher_bias=teacher_bias, beta=beta, temperature=temperature, alpha=alpha,
        scale_by_t2=scale_by_t2, ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    gather_in_backward(student_head, loss)
    return loss


class DistillationTrainer(Trainer):
    """transformers Trainer whose loss is fastft's fused distillation loss against a frozen `teacher`; the options
    are checked here, before any training step (their ranges: fastft.losses)."""

    def __init__(self, *args, teacher: nn.Module, beta: float = 0.0, temperature: float = 1.0, alpha: float = 1.0,
                 scale_by_t2: bool = False, **kwargs):
        check_options(beta=beta, temperature=temperature, alpha=alpha, scale_by_t2=scale_by_t2)
        super().__init__(*args, **kwargs)
        self.teacher = teacher.eval().requires_grad_(False)
        self.distillation_options = dict(beta=beta, temperature=temperature, alpha=alpha, scale_by_t2=scale_by_t2)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = distillation_loss(model, self.teacher, inputs, num_items_in_batch=num_items_in_batch,
                                 **self.distillation_options)
        return (loss, None) if return_outputs else loss
