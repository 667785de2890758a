"""QLoRA without bitsandbytes: peft's LoRA on fastft's NF4Linear (fastft.quantize_model + lora_config_for_nf4),
unpatched and fused by fastft.patch, against peft's LoRA on the same weights held dense."""

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora
from torch import nn

import fastft
from fastft import nf4
from fastft.integrations.peft_nf4 import LoraNF4Linear
from fastft.nn import NF4Linear
from test_lora_patch import base_model, batch, lora_config, losses_over_steps, outputs


def dequantized_copy(model: nn.Module) -> nn.Module:
    """The same model with every NF4Linear replaced by a dense nn.Linear holding its dequantized weight."""
    import copy

    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, NF4Linear):
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, module.to_linear())
    return dense


def nf4_pair(dropout=0.0, **extra):
    """(peft LoRA on the dequantized dense model, peft LoRA on the 4-bit model), same adapter initialization."""
    quantized = fastft.quantize_model(base_model("llama"), blocksize=32)
    dense = dequantized_copy(quantized)
    torch.manual_seed(1)
    reference = get_peft_model(dense, lora_config("llama", dropout, **extra))
    torch.manual_seed(1)
    ours = get_peft_model(quantized, fastft.lora_config_for_nf4(lora_config("llama", dropout, **extra), quantized))
    return reference, ours


def test_peft_wraps_nf4linear_and_trains_as_on_the_dense_weights():
    reference, ours = nf4_pair()
    layers = [m for m in ours.modules() if isinstance(m, peft_lora.LoraLayer)]
    assert len(layers) == 14 and all(type(m) is LoraNF4Linear for m in layers)
    assert all(isinstance(m.get_base_layer(), NF4Linear) for m in layers)
    assert torch.allclose(outputs(ours), outputs(reference), rtol=1e-5, atol=1e-6)
    theirs = losses_over_steps(reference, 10)
    for a, b in zip(losses_over_steps(ours, 10), theirs):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_patch_fuses_lora_on_nf4linear_like_bitsandbytes_qlora():
    reference, ours = nf4_pair()
    report = fastft.patch(ours)
    assert report.fused["lora.LoraNF4Linear"] == 14 and not report.unfused
    assert len(report.input_groups) == 4  # q/k/v and gate/up of both blocks
    theirs = losses_over_steps(reference, 10)
    for a, b in zip(losses_over_steps(ours, 10), theirs):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert fastft.unpatch(ours) == 14
    assert all(type(m) is LoraNF4Linear for m in ours.modules() if isinstance(m, peft_lora.LoraLayer))


def test_merge_requantizes_the_merged_weight_and_adapters_save_and_load(tmp_path):
    _, ours = nf4_pair()
    losses_over_steps(ours, 3)  # move B away from its zero init
    layer = ours.base_model.model.model.layers[0].mlp.down_proj
    base = layer.get_base_layer()
    dense = base.to_linear().weight.detach()
    delta = layer.get_delta_weight("default").detach()
    expected = nf4.dequantize(*nf4.quantize(dense + delta, 32, double_quant=True))
    before = outputs(ours)
    ours.save_pretrained(tmp_path / "adapter")
    merged = ours.merge_and_unload()
    assert sum(isinstance(m, NF4Linear) for m in merged.modules()) == 14
    assert not any(isinstance(m, peft_lora.LoraLayer) for m in merged.modules())
    assert torch.equal(merged.model.layers[0].mlp.down_proj.to_linear().weight, expected)

    fresh = fastft.quantize_model(base_model("llama"), blocksize=32)
    config = fastft.lora_config_for_nf4(LoraConfig.from_pretrained(tmp_path / "adapter"))
    loaded = PeftModel.from_pretrained(fresh, tmp_path / "adapter", config=config)
    assert torch.allclose(outputs(loaded), before, rtol=1e-5, atol=1e-6)


def test_lora_variants_and_unregistered_configs_are_refused_clearly():
    quantized = fastft.quantize_model(base_model("llama"))
    with pytest.raises(ValueError, match="DoraLinearVariant is not supported on a fastft NF4Linear base"):
        get_peft_model(quantized, fastft.lora_config_for_nf4(lora_config("llama", use_dora=True), quantized))
    with pytest.raises(ValueError, match="'all-linear' needs the model"):
        fastft.lora_config_for_nf4(lora_config("llama"))
    with pytest.raises(TypeError, match="config must be a peft LoraConfig"):
        fastft.lora_config_for_nf4({"r": 8})


def test_unmerge_restores_the_4bit_weight_exactly():
    """Merging rounds W + delta to 4 bits; unmerging all adapters gives back the original codes and statistics, so
    merge / unmerge cycles (e.g. for generation) never drift the frozen base."""
    _, ours = nf4_pair()
    losses_over_steps(ours, 3)
    before = outputs(ours)
    layers = [m for m in ours.modules() if isinstance(m, LoraNF4Linear)]
    codes = [m.get_base_layer().weight.detach().clone() for m in layers]
    for _ in range(2):
        ours.merge_adapter()
        assert not all(torch.equal(m.get_base_layer().weight, c) for m, c in zip(layers, codes))
        ours.unmerge_adapter()
    assert all(torch.equal(m.get_base_layer().weight, c) for m, c in zip(layers, codes))
    assert torch.equal(outputs(ours), before)
