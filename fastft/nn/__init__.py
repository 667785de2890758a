"""Drop-in nn.Modules built on fastft's ops."""

from fastft.nn.bottleneck import BottleneckAdapter
from fastft.nn.distillation import FusedLinearDistillationLoss
from fastft.nn.domain import DomainClassifier, GradientReversal
from fastft.nn.fake_quant_linear import FakeQuantLinear, QuantizedLinear
from fastft.nn.lora import LoraLinear
from fastft.nn.nf4_linear import NF4Linear

__all__ = ["BottleneckAdapter", "DomainClassifier", "GradientReversal", "FakeQuantLinear", "FusedLinearDistillationLoss", "LoraLinear", "NF4Linear",
           "QuantizedLinear"]
