"""4-bit base models without bitsandbytes: `quantize_model` replaces a model's linear layers by fastft's NF4Linear."""

from __future__ import annotations

import torch
from torch import nn

from fastft.methods.common import as_names, name_matches, replace_module
from fastft.nn import NF4Linear


def quantize_model(model: nn.Module, blocksize: int = 64, double_quant: bool = True, skip=("lm_head",),
                   quant_type: str = "nf4", compute_dtype: torch.dtype | None = None) -> nn.Module:
    """Replace every `torch.nn.Linear` of `model` (in place) by an NF4Linear, except modules named in `skip`
    (a module name or its last component, e.g. "lm_head"). Returns the model.

    When the model has a transformers config, its `quantization_config` is set to the matching bitsandbytes
    4-bit config, so `save_pretrained` output loads with transformers + bitsandbytes.
    """
    skip = as_names(skip)
    targets = [(name, module) for name, module in model.named_modules()
               if type(module) is nn.Linear and not name_matches(name, skip)]
    for name, linear in targets:
        replace_module(model, name, NF4Linear.from_linear(linear, blocksize, double_quant, compute_dtype, quant_type))
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict"):
        config.quantization_config = {
            "quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "bnb_4bit_quant_type": quant_type, "bnb_4bit_use_double_quant": double_quant,
            "bnb_4bit_compute_dtype": str(compute_dtype or torch.float32).removeprefix("torch."),
            "bnb_4bit_quant_storage": "uint8", "llm_int8_skip_modules": list(skip),
        }
    return model
