"""Quantization-aware fine-tuning: fake quantization with torchao's exact numerics, in one pass per group
(fastft/fake_quant.py), and the recipe that swaps a model's linear layers for FakeQuantLinear and back to integer
weights (`prepare`, `convert`: fastft/methods/qat.py)."""

from fastft.fake_quant import GRANULARITIES, fake_quantize, fake_quantize_with_scale, initial_qparams, initial_scales
from fastft.methods.qat import convert, prepare

__all__ = ["GRANULARITIES", "convert", "fake_quantize", "fake_quantize_with_scale", "initial_qparams",
           "initial_scales", "prepare"]
