"""Drop-in nn.Modules built on fastft's ops."""

from fastft.nn.bottleneck import BottleneckAdapter
from fastft.nn.distillation import FusedLinearDistillationLoss
from fastft.nn.nf4_linear import NF4Linear

__all__ = ["BottleneckAdapter", "FusedLinearDistillationLoss", "NF4Linear"]
