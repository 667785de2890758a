"""Interop with transformers, peft and bitsandbytes."""

from fastft.integrations.transformers import quantize_model

__all__ = ["quantize_model"]
