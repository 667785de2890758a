"""fastft.nn.LoraLinear: LoRA and DoRA on a frozen base, against plain-torch formulas in fp64."""

import math

import pytest
import torch
from torch import nn

from conftest import rel_error
from fastft.nn import LoraLinear, NF4Linear
from fastft.nn.lora import new_seed
from fastft.reference.lora import lora_delta_ref


def _layer(use_dora=False, dropout=0.0, base=None, rslora=False):
    torch.manual_seed(0)
    layer = LoraLinear(base if base is not None else nn.Linear(40, 24), r=4, alpha=8.0, dropout=dropout,
                       use_dora=use_dora, use_rslora=rslora)
    with torch.no_grad():
        layer.lora_B.normal_()
    return layer


def test_new_layer_returns_the_base_output_and_trains_only_the_adapter():
    torch.manual_seed(0)
    base = nn.Linear(40, 24)
    layer = LoraLinear(base, r=4, alpha=8.0)
    x = torch.randn(2, 5, 40)
    assert torch.equal(layer(x), base(x))
    assert sorted(n for n, p in layer.named_parameters() if p.requires_grad) == ["lora_A", "lora_B"]
    assert layer.scale == 2.0 and LoraLinear(nn.Linear(40, 24), r=4, alpha=8.0, use_rslora=True).scale == 4.0


def test_lora_forward_and_gradients_match_the_formula():
    layer = _layer()
    x = torch.randn(3, 7, 40, requires_grad=True)
    out = layer(x)
    x64 = x.detach().double().requires_grad_()
    A64, B64 = (p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B))
    base = layer.base
    expected = (torch.nn.functional.linear(x64, base.weight.double(), base.bias.double())
                + lora_delta_ref(x64, A64, B64, layer.scale, 0.0, 0))
    assert out.shape == (3, 7, 24) and rel_error(out, expected) < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for ours, theirs in ((x.grad, x64.grad), (layer.lora_A.grad, A64.grad), (layer.lora_B.grad, B64.grad)):
        assert rel_error(ours, theirs) < 1e-5


def test_dropout_mask_comes_from_a_seed_of_torch_generator():
    layer = _layer(dropout=0.3).train()
    x = torch.randn(6, 40)
    torch.manual_seed(5)
    out = layer(x)
    torch.manual_seed(5)
    seed = new_seed()
    expected = layer.base(x).double() + lora_delta_ref(x.double(), layer.lora_A.double(), layer.lora_B.double(),
                                                       layer.scale, 0.3, seed)
    assert rel_error(out, expected) < 1e-5
    assert not torch.allclose(out, layer.eval()(x))  # eval mode runs without dropout


def test_dora_matches_the_magnitude_rescaled_formula():
    layer = _layer(use_dora=True)
    with torch.no_grad():
        layer.magnitude.mul_(torch.linspace(0.5, 1.5, 24))
    x = torch.randn(9, 40)
    out = layer(x)
    W, b = layer.base.weight.double(), layer.base.bias.double()
    A64, B64, m64 = (p.detach().double().requires_grad_() for p in (layer.lora_A, layer.lora_B, layer.magnitude))
    merged = W + layer.scale * B64 @ A64
    norm = merged.detach().norm(dim=1)  # detached, as in peft
    expected = (x.double() @ merged.t()) * (m64 / norm) + b
    assert rel_error(out, expected) < 1e-5
    grad = torch.randn_like(out)
    out.backward(grad)
    expected.backward(grad.double())
    for ours, theirs in ((layer.lora_A.grad, A64.grad), (layer.lora_B.grad, B64.grad),
                         (layer.magnitude.grad, m64.grad)):
        assert rel_error(ours, theirs) < 1e-5


def test_a_new_dora_layer_returns_the_base_output():
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(40, 24), r=4, use_dora=True)
    x = torch.randn(5, 40)
    assert rel_error(layer(x), layer.base(x).double()) < 1e-6


def test_lora_on_a_4bit_base():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32)
    layer = _layer(base=NF4Linear.from_linear(dense))
    assert layer.lora_A.dtype == torch.float32
    x = torch.randn(4, 64)
    base = layer.base
    expected = (base.to_linear().double()(x.double())
                + lora_delta_ref(x.double(), layer.lora_A.double(), layer.lora_B.double(), layer.scale, 0.0, 0))
    assert rel_error(layer(x), expected) < 1e-5


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="r must be a positive int"):
        LoraLinear(nn.Linear(4, 4), r=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        LoraLinear(nn.Linear(4, 4), r=2, dropout=1.0)
    with pytest.raises(TypeError, match="base must be a linear layer"):
        LoraLinear(nn.ReLU(), r=2)
    with pytest.raises(TypeError, match="use_dora needs a dense nn.Linear"):
        LoraLinear(NF4Linear.from_linear(nn.Linear(64, 32)), r=2, use_dora=True)
    with pytest.raises(ValueError, match="last dim must be in_features=4"):
        LoraLinear(nn.Linear(4, 4), r=2)(torch.randn(3, 5))
    assert math.isclose(LoraLinear(nn.Linear(4, 4), r=2, alpha=4).scale, 2.0)
