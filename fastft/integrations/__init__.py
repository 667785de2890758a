"""Interop with transformers, peft and bitsandbytes."""

from fastft.integrations.peft import PatchReport, patch, unpatch
from fastft.integrations.transformers import quantize_model

__all__ = ["PatchReport", "patch", "quantize_model", "unpatch"]
