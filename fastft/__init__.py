"""fastft: fused kernels for fine-tuning large models (4-bit weights and LoRA; see README)."""

from fastft import losses, nf4, ops
from fastft.integrations import PatchReport, patch, quantize_model, unpatch
from fastft.nn import NF4Linear

__version__ = "0.1.0"
__all__ = ["NF4Linear", "PatchReport", "losses", "nf4", "ops", "patch", "quantize_model", "unpatch"]
