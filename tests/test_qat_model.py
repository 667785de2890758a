"""FakeQuantLinear, fastft.qat.prepare / convert on a mini Llama, against torchao's own QAT prepare."""

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import fastft.qat
from conftest import causal_lm_losses
from fastft.nn import FakeQuantLinear, QuantizedLinear

torchao = pytest.importorskip("torchao")

VOCAB = 128


def mini_llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def batch(step):
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(step))


def train(model, steps=20):
    return causal_lm_losses(model, batch, steps)


@pytest.mark.parametrize("activation_bits", (None, 8))
def test_prepared_model_trains_like_torchao_qat(activation_bits):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig

    ours = mini_llama()
    theirs = copy.deepcopy(ours)
    left = fastft.qat.prepare(ours, weight_bits=4, group_size=32, activation_bits=activation_bits)
    assert left == {"lm_head": "skipped"}
    assert sum(isinstance(m, FakeQuantLinear) for m in ours.modules()) == 14
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    activation = (IntxFakeQuantizeConfig(torch.int8, granularity="per_token", is_symmetric=False)
                  if activation_bits else None)
    quantize_(theirs, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
              filter_fn=lambda module, name: isinstance(module, nn.Linear) and "lm_head" not in name)
    our_losses, their_losses = train(ours), train(theirs)
    for a, b in zip(our_losses, their_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert our_losses[-1] < our_losses[0]


def test_convert_gives_the_fake_quantized_outputs_and_packs_int4():
    model = mini_llama()
    fastft.qat.prepare(model, weight_bits=4, group_size=32, activation_bits=8)
    train(model, steps=3)
    ids = batch(99)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    assert fastft.qat.convert(model) == 14
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, QuantizedLinear)
    assert layer.weight_codes.dtype == torch.uint8 and layer.weight_codes.shape == (64, 32)
    assert layer.weight_scales.shape == (64, 2)
    assert int(layer.codes().min()) >= -8 and int(layer.codes().max()) <= 7
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, expected)


def test_frozen_weight_is_fake_quantized_once_until_it_changes(monkeypatch):
    from fastft.ops import qat as qat_ops

    calls = []  # fake quantizations of the weight, wherever they happen
    real = qat_ops.fake_quantize
    monkeypatch.setattr(qat_ops, "fake_quantize", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    layer = FakeQuantLinear.from_linear(nn.Linear(64, 16), weight_bits=4, group_size=32)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, 64, requires_grad=True)
    first = layer(x)
    layer(x).sum().backward()
    assert len(calls) == 1 and torch.equal(first, layer(x))
    with torch.no_grad():
        layer.weight.mul_(2)  # an in-place update bumps the version counter
    assert not torch.equal(layer(x), first) and len(calls) == 2
    layer.weight.requires_grad_(True)
    layer(x)
    layer(x)
    assert len(calls) == 4  # a trainable weight is fake-quantized every call (and again in its backward)


def test_fake_quant_linear_matches_torchao_linear_and_shares_parameters():
    from torchao.quantization.qat import IntxFakeQuantizeConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    linear = nn.Linear(96, 40)
    ours = FakeQuantLinear.from_linear(linear, weight_bits=4, group_size=32, activation_bits=8)
    assert ours.weight is linear.weight and ours.to_linear().weight is linear.weight
    theirs = FakeQuantizedLinear(96, 40, bias=True, activation_config=IntxFakeQuantizeConfig(
        torch.int8, granularity="per_token", is_symmetric=False), weight_config=IntxFakeQuantizeConfig(
        torch.int4, group_size=32, is_symmetric=True))
    theirs.load_state_dict(linear.state_dict())
    x = torch.randn(5, 7, 96)
    assert torch.equal(ours(x), theirs(x))
    with pytest.raises(ValueError, match="multiple of group_size"):
        FakeQuantLinear.from_linear(nn.Linear(40, 8), group_size=32)


def test_patch_runs_a_torchao_prepared_model_on_fastft_kernels(monkeypatch):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    import fastft
    from fastft.integrations import qat as qat_integration

    model = mini_llama()
    weight = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True)
    activation = IntxFakeQuantizeConfig(torch.int8, granularity="per_token", is_symmetric=False)
    quantize_(model, QATConfig(activation_config=activation, weight_config=weight, step="prepare"),
              filter_fn=lambda module, name: isinstance(module, nn.Linear) and "lm_head" not in name)
    from torchao.quantization.qat.fake_quantizer import IntxFakeQuantizer

    model.model.layers[1].mlp.down_proj.weight_fake_quantizer = IntxFakeQuantizer(  # a config fastft leaves alone
        IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False))
    unpatched = copy.deepcopy(model)
    ids = batch(5)
    report = fastft.patch(model)
    assert report.fused["torchao.FakeQuantizedLinear"] == 13
    assert "asymmetric per-group" in report.unfused["model.layers.1.mlp.down_proj"]
    calls = []
    real = qat_integration.fake_quantize
    monkeypatch.setattr(qat_integration, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert torch.equal(model(input_ids=ids).logits, unpatched(input_ids=ids).logits)
    assert len(calls) == 26  # weight and activation of the 13 swapped layers
    assert fastft.unpatch(model) == 13
    assert all(type(m) is FakeQuantizedLinear for m in model.modules() if isinstance(m, FakeQuantizedLinear))


def test_qat_with_lora_on_top_uses_fused_lora_and_a_cached_base(monkeypatch):
    """QAT + LoRA: peft wraps FakeQuantLinear (an nn.Linear), fastft.patch fuses the LoRA term, and the frozen base
    weight is fake-quantized once, not every step; losses equal the unpatched peft model's."""
    from peft import LoraConfig, get_peft_model

    import fastft
    from fastft.nn import fake_quant_linear

    model = mini_llama()
    fastft.qat.prepare(model, weight_bits=4, group_size=32)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                  lora_dropout=0.0))
    reference = copy.deepcopy(peft_model)
    report = fastft.patch(peft_model)
    assert report.fused["lora.Linear"] == 4
    calls = []
    real = fake_quant_linear.fake_quantize
    monkeypatch.setattr(fake_quant_linear, "fake_quantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = train(peft_model, steps=5)
    assert len(calls) == 14  # each frozen base weight once, over 5 steps
    monkeypatch.setattr(fake_quant_linear, "fake_quantize", real)
    for a, b in zip(ours, train(reference, steps=5)):
        assert abs(a - b) <= 1e-5 * abs(b)
