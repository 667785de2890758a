"""Former home of the distillation recipe (now fastft/methods/distillation.py) and of `head_weight` (now
fastft/integrations/heads.py): the old import path keeps working."""

from fastft.integrations.heads import head_weight
from fastft.methods.distillation import DistillationTrainer, distillation_loss

__all__ = ["DistillationTrainer", "distillation_loss", "head_weight"]
