"""fastft: fused kernels for fine-tuning large models (4-bit weights, LoRA, distillation losses; see README)."""

from fastft import losses, nf4, ops
from fastft.nn import NF4Linear

__version__ = "0.1.0"
__all__ = ["NF4Linear", "PatchReport", "lora_config_for_nf4", "losses", "nf4", "ops", "patch", "quantize_model",
           "unpatch"]

_INTEGRATIONS = ("PatchReport", "lora_config_for_nf4", "patch", "unpatch")


def __getattr__(name):
    # transformers and peft load on first use of the integrations, not on `import fastft`.
    if name in _INTEGRATIONS:
        from fastft import integrations

        return getattr(integrations, name)
    if name == "quantize_model":
        from fastft.methods.quantize import quantize_model

        return quantize_model
    raise AttributeError(f"module 'fastft' has no attribute {name!r}")
