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


def _torchao_learned_qparams_model(configs):
    from torchao.quantization import quantize_
    from torchao.quantization.qat import QATConfig, initialize_fake_quantizers

    model = mini_llama()
    for config, part in configs:
        quantize_(model, QATConfig(weight_config=config, step="prepare"),
                  filter_fn=lambda module, name, part=part: isinstance(module, nn.Linear) and part in name)
    initialize_fake_quantizers(model, (batch(0),))
    return model


def test_patch_runs_torchao_range_learning_and_static_qparams_with_their_own_parameters():
    """Learned symmetric scales (range learning) and static asymmetric int8 qparams, patched: the same logits, and
    10 AdamW steps (weights and scales) give torchao's losses."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    import fastft

    learned = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=True, is_dynamic=False,
                                     range_learning=True)
    static = IntxFakeQuantizeConfig(torch.int8, group_size=32, is_symmetric=False, is_dynamic=False)
    model = _torchao_learned_qparams_model(((learned, "self_attn"), (static, "mlp")))
    theirs = copy.deepcopy(model)
    report = fastft.patch(model)
    assert report.fused["torchao.FakeQuantizedLinear"] == 14 and not report.unfused
    ids = batch(1)
    assert torch.equal(model(input_ids=ids).logits, theirs(input_ids=ids).logits)
    our_losses, their_losses = train(model, steps=10), train(theirs, steps=10)
    for a, b in zip(our_losses, their_losses):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert our_losses[-1] < our_losses[0]


def test_patch_runs_torchao_learned_zero_points():
    """Learned float zero points: the same logits and every gradient (weights, scales, zero points) within fp32
    rounding of torchao's. Longer runs are not compared step for step: a zero point near 0 whose gradient is a
    cancellation residue moves by about AdamW's lr on that residue's sign, and r + zp against qmax then clamps or
    not, so the trajectory follows the summation order of d(zero point) (torch's depends on the CPU's vector
    width; fastft sums in fp64)."""
    from torchao.quantization.qat import IntxFakeQuantizeConfig

    import fastft

    learned = IntxFakeQuantizeConfig(torch.int4, group_size=32, is_symmetric=False, is_dynamic=False,
                                     range_learning=True, zero_point_precision=torch.float32)
    model = _torchao_learned_qparams_model(((learned, "proj"),))
    theirs = copy.deepcopy(model)
    assert fastft.patch(model).fused["torchao.FakeQuantizedLinear"] == 14
    ids = batch(1)
    ours_loss, their_loss = model(input_ids=ids, labels=ids).loss, theirs(input_ids=ids, labels=ids).loss
    assert torch.equal(ours_loss, their_loss)
    ours_loss.backward()
    their_loss.backward()
    learned_names = {"scale", "zero_point"}
    for (name, ours), (_, their) in zip(model.named_parameters(), theirs.named_parameters()):
        assert (ours.grad - their.grad).abs().max() <= 1e-5 * their.grad.abs().max() + 1e-12, name
    assert sum(name.rsplit(".", 1)[-1] in learned_names for name, _ in model.named_parameters()) == 28
    losses = train(model, steps=10)
    assert losses[-1] < losses[0]


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
