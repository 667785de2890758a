"""fastft: fused kernels for fine-tuning large models (4-bit weights first; see README)."""

from fastft import nf4, ops
from fastft.integrations import quantize_model
from fastft.nn import NF4Linear

__version__ = "0.1.0"
__all__ = ["NF4Linear", "nf4", "ops", "quantize_model"]
