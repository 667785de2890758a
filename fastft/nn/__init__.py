"""Drop-in nn.Modules built on fastft's ops."""

from fastft.nn.distillation import FusedLinearDistillationLoss
from fastft.nn.nf4_linear import NF4Linear

__all__ = ["FusedLinearDistillationLoss", "NF4Linear"]
