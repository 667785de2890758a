"""Interop with transformers, peft and bitsandbytes."""

from fastft.integrations.peft import PatchReport, patch, unpatch
from fastft.integrations.peft_nf4 import LoraNF4Linear, lora_config_for_nf4
from fastft.integrations.transformers import quantize_model

__all__ = ["LoraNF4Linear", "PatchReport", "lora_config_for_nf4", "patch", "quantize_model", "unpatch"]
