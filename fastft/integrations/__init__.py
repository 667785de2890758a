"""What patches other libraries' objects: peft (LoRA layers), bitsandbytes (4-bit layers), torchao (QAT layers),
transformers (a causal LM's loss), through `patch` / `unpatch`."""

from fastft.integrations.peft import PatchReport, patch, unpatch
from fastft.integrations.peft_nf4 import LoraNF4Linear, lora_config_for_nf4

__all__ = ["LoraNF4Linear", "PatchReport", "lora_config_for_nf4", "patch", "quantize_model", "unpatch"]


def __getattr__(name):
    # quantize_model is a recipe (fastft/methods/quantize.py); this path is kept for compatibility.
    if name == "quantize_model":
        from fastft.methods.quantize import quantize_model

        return quantize_model
    raise AttributeError(f"module 'fastft.integrations' has no attribute {name!r}")
