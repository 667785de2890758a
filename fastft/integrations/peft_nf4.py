"""peft LoRA on fastft's NF4Linear: QLoRA without bitsandbytes.

peft builds its LoRA layers from the type of the module it wraps and knows no fastft type, so a model quantized by
`fastft.quantize_model` needs its LoraConfig told about NF4Linear once, through peft's dispatch for custom modules:

    model = fastft.quantize_model(model)
    model = get_peft_model(model, fastft.lora_config_for_nf4(LoraConfig(...), model))
    fastft.patch(model)     # fuses the LoRA terms, as for bitsandbytes QLoRA

`LoraNF4Linear` is peft's `lora.Linear` (same parameters, forward, adapters, save/load) whose merge and unmerge
dequantize the 4-bit weight, add or subtract the LoRA delta and quantize it again in the layer's own format
(blocksize, double quant, NF4/FP4), as peft does for bitsandbytes' 4-bit layers.
"""

from __future__ import annotations

from typing import Optional

import torch
from peft.tuners.lora import layer as peft_lora
from torch import nn

from fastft import nf4
from fastft.nn import NF4Linear


class LoraNF4Linear(peft_lora.Linear):
    """peft's LoRA layer around a fastft NF4Linear. Plain LoRA only (several adapters, dropout, lora_bias, rsLoRA);
    LoRA variants (DoRA, aLoRA, ...) are refused when the adapter is added."""

    def __init__(self, base_layer, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs) -> None:
        base = base_layer.get_base_layer() if isinstance(base_layer, peft_lora.LoraLayer) else base_layer
        if not isinstance(base, NF4Linear):
            raise TypeError(f"base_layer must be a fastft NF4Linear, got {type(base).__name__}")
        if config.fan_in_fan_out:
            raise ValueError("fan_in_fan_out must be False for an NF4Linear base (its weight is (out, in), as "
                             "nn.Linear's)")
        super().__init__(base_layer, adapter_name, config, r=r, lora_alpha=lora_alpha, **kwargs)

    def resolve_lora_variant(self, *, config, **kwargs):
        variant = super().resolve_lora_variant(config=config, **kwargs)
        if variant is not None:
            raise ValueError(f"{type(variant).__name__} is not supported on a fastft NF4Linear base (plain LoRA is); "
                             "use a dense base for LoRA variants")
        return None

    def _merged_weight(self, adapter: str, sign: int) -> torch.Tensor:
        base = self.get_base_layer()
        dense = nf4.dequantize(base.weight, base.quant_state, torch.float32)
        return dense.add_(self.get_delta_weight(adapter).detach().to(torch.float32), alpha=sign)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        """Merge adapters into the 4-bit weight: dequantize, add scale * B @ A, quantize again (4-bit rounding: the
        merged layer's outputs differ from the unmerged ones by that rounding). The unmerged 4-bit weight is kept
        aside (outside the parameters and buffers), so that unmerging all adapters restores it exactly instead of
        rounding to 4 bits once more."""
        adapter_names = peft_lora.check_adapters_to_merge(self, adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            weight = self._merged_weight(adapter, +1)
            bias = None
            if self.lora_bias[adapter]:
                if base.bias is None:
                    raise RuntimeError("Impossible to merge LoRA with `lora_bias=True` because the base layer has no "
                                       "bias.")
                bias = base.bias.detach() + self.lora_B[adapter].bias.detach() * self.scaling[adapter]
            if safe_merge and not (torch.isfinite(weight).all() and (bias is None or torch.isfinite(bias).all())):
                raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
            if not self.merged_adapters:
                self.__dict__["_fastft_unmerged_weight"] = (base.weight.data, base.quant_state)
            base.set_weight(weight)
            if bias is not None:
                base.bias.data = bias.to(base.bias.dtype)
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            unmerged = self.__dict__.pop("_fastft_unmerged_weight", None) if not self.merged_adapters else None
            if unmerged is not None:
                base.weight.data = unmerged[0]
                base._set_state(unmerged[1])
            else:
                base.set_weight(self._merged_weight(adapter, -1))
            if self.lora_bias[adapter]:
                base.bias.data -= (self.lora_B[adapter].bias * self.scaling[adapter]).to(base.bias.dtype)


def lora_config_for_nf4(config, model: Optional[nn.Module] = None):
    """Let peft wrap fastft's NF4Linear layers with LoRA under `config` (a peft LoraConfig, returned): registers
    `LoraNF4Linear` for NF4Linear targets through peft's dispatch for custom modules. peft resolves
    target_modules="all-linear" from the layer types it knows; pass the `model` to have it resolved here instead,
    to the names of its NF4Linear and nn.Linear layers except the output head, as peft does for dense models."""
    from peft import LoraConfig

    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a peft LoraConfig, got {type(config).__name__}")
    if config.target_modules == "all-linear":
        if model is None:
            raise ValueError("target_modules='all-linear' needs the model: lora_config_for_nf4(config, model)")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        config.target_modules = {name.rpartition(".")[2] for name, module in model.named_modules()
                                 if isinstance(module, (NF4Linear, nn.Linear)) and module is not head}
    config._register_custom_module({NF4Linear: LoraNF4Linear})
    return config
