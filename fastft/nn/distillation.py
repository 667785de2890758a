"""FusedLinearDistillationLoss: nn.Module form of fastft.losses.fused_linear_distillation."""

from __future__ import annotations

from torch import Tensor, nn

from fastft.losses import check_options, fused_linear_distillation


class FusedLinearDistillationLoss(nn.Module):
    """loss = module(student_hidden, student_weight, teacher_hidden, teacher_weight, labels=None, ...).

    Options (beta, temperature, alpha, scale_by_t2, ignore_index, reduction, teacher_topk) are fixed and checked at
    construction (the ranges in fastft.losses: beta and alpha in [0, 1], temperature in [0.01, 100], teacher_topk
    None or an int >= 1); biases and num_items_in_batch are per call. Never materializes [tokens, vocab] logits.
    """

    def __init__(self, beta: float = 0.0, temperature: float = 1.0, alpha: float = 1.0, scale_by_t2: bool = False,
                 ignore_index: int = -100, reduction: str = "mean", teacher_topk: int | None = None):
        super().__init__()
        check_options(beta=beta, temperature=temperature, alpha=alpha, scale_by_t2=scale_by_t2,
                      ignore_index=ignore_index, reduction=reduction, teacher_topk=teacher_topk)
        self.teacher_topk = teacher_topk
        self.beta, self.temperature, self.alpha = beta, temperature, alpha
        self.scale_by_t2, self.ignore_index, self.reduction = scale_by_t2, ignore_index, reduction

    def forward(self, student_hidden: Tensor, student_weight: Tensor, teacher_hidden: Tensor,
                teacher_weight: Tensor, labels: Tensor | None = None, *, student_bias: Tensor | None = None,
                teacher_bias: Tensor | None = None, num_items_in_batch=None) -> Tensor:
        return fused_linear_distillation(
            student_hidden, student_weight, teacher_hidden, teacher_weight, labels, student_bias=student_bias,
            teacher_bias=teacher_bias, beta=self.beta, temperature=self.temperature, alpha=self.alpha,
            scale_by_t2=self.scale_by_t2, ignore_index=self.ignore_index, reduction=self.reduction,
            num_items_in_batch=num_items_in_batch, teacher_topk=self.teacher_topk)

    def extra_repr(self) -> str:
        return (f"beta={self.beta}, temperature={self.temperature}, alpha={self.alpha}, "
                f"scale_by_t2={self.scale_by_t2}, reduction={self.reduction!r}")
