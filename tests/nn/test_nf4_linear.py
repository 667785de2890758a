"""NF4Linear and quantize_model with real bitsandbytes layers and real transformers models (random init, no downloads)."""

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config
from transformers import Qwen2ForCausalLM

import fastft
from conftest import bnb_standard_layout, rel_error, repack_for_bnb_cpu_kernel
from fastft import nf4
from fastft.nn import NF4Linear
from fastft.reference import nf4 as ref


def bnb_linear(linear: nn.Linear, double_quant=True, quant_type="nf4") -> bnb.nn.Linear4bit:
    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=double_quant, quant_type=quant_type)
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")  # bitsandbytes quantizes on .to(device)


@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_from_bnb_shares_storage_and_matches_outputs(double_quant, quant_type):
    # in_features a multiple of the blocksize: bitsandbytes' AVX-512 CPU dequantize is wrong otherwise (next test)
    layer = bnb_linear(nn.Linear(128, 40), double_quant, quant_type)
    ours = NF4Linear.from_bnb(layer)
    assert ours.weight.data_ptr() == layer.weight.data_ptr() and ours.bias is layer.bias
    x = torch.randn(3, 5, 128)
    with torch.no_grad():
        assert rel_error(ours(x), layer(x)) < 1e-6
    assert torch.equal(ours.to_linear().weight, bnb.functional.dequantize_4bit(layer.weight.data,
                                                                               layer.weight.quant_state))


@pytest.mark.parametrize("double_quant", (False, True))
def test_from_bnb_with_blocks_straddling_rows_matches_the_reference(double_quant):
    """in_features 96, blocks of 64: blocks straddle rows. bitsandbytes' AVX-512 CPU dequantize reads such weights
    wrongly, so the oracle is fastft's reference dequantization of bitsandbytes' own bytes."""
    layer = bnb_linear(nn.Linear(96, 40), double_quant)
    ours = NF4Linear.from_bnb(layer)
    state = ours.quant_state
    absmax = state.absmax
    if double_quant:
        absmax = ref.nested_absmax_ref(absmax, state.nested_absmax, state.nested_code, state.nested_offset)
    expected = ref.dequantize_4bit_ref(layer.weight.data, absmax, state.code, 64, (40, 96), torch.float32)
    assert torch.equal(ours.to_linear().weight, expected)


@pytest.mark.parametrize("double_quant", (False, True))
def test_from_bnb_reads_a_weight_repacked_for_the_bnb_cpu_kernel(double_quant):
    """bitsandbytes repacks a Linear4bit's weight for its CPU kernel (tiles of codes, bf16 absmax) in eval mode on
    AVX512_BF16 CPUs; the conversion is called directly here so that this runs on every CPU. fastft converts it
    back with bitsandbytes' inverse: the dense weight is the original codes times the bf16-rounded absmax (without
    double quant exactly; with it, up to the 8-bit requantization of that absmax, 1/127 of a block's largest)."""
    layer = bnb_linear(nn.Linear(128, 64), double_quant)
    original = NF4Linear.from_bnb(layer).quant_state
    codes = layer.weight.data.clone()
    absmax = original.absmax
    if double_quant:
        absmax = ref.nested_absmax_ref(absmax, original.nested_absmax, original.nested_code, original.nested_offset)
    expected = ref.dequantize_4bit_ref(codes, absmax.bfloat16().float(), original.code, 64, (64, 128),
                                       torch.float32)
    assert repack_for_bnb_cpu_kernel(layer) == 1 and layer.weight.quant_state.packing_format_for_cpu
    assert not torch.equal(layer.weight.data.flatten(), codes.flatten())  # the codes were re-laid
    ours = NF4Linear.from_bnb(layer)
    assert not layer.weight.quant_state.packing_format_for_cpu and ours.weight.data_ptr() == layer.weight.data_ptr()
    assert torch.equal(layer.weight.data, codes)
    weight = ours.to_linear().weight
    if double_quant:
        assert rel_error(weight, expected) < 1 / 127
    else:
        assert torch.equal(weight, expected)


def test_bnb_repacks_in_eval_mode_exactly_on_avx512_bf16_cpus():
    """The machine's own branch of that bitsandbytes behaviour: an eval-mode forward without gradients repacks the
    weight where bitsandbytes finds AVX512_BF16, and leaves it otherwise; NF4Linear.from_bnb reads both."""
    linear = nn.Linear(128, 64)
    layer = bnb_linear(linear).eval()
    x = torch.randn(4, 128)
    with torch.no_grad():
        layer(x)
    assert bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)) == bnb.functional.has_avx512bf16()
    ours = NF4Linear.from_bnb(layer)
    expected = NF4Linear.from_linear(linear, double_quant=False)
    assert rel_error(ours(x), expected(x)) < 1e-2  # bf16-rounded absmax where bitsandbytes repacked


def test_state_dict_round_trips_with_bitsandbytes_keys():
    linear = nn.Linear(96, 40)
    layer = bnb_linear(linear)
    theirs = layer.state_dict()
    ours_module = NF4Linear.from_linear(linear)
    ours = ours_module.state_dict()
    assert sorted(ours) == sorted(theirs)
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key
    fresh = NF4Linear(96, 40, double_quant=False)  # another layout: loading replaces it
    fresh.load_state_dict(theirs)
    assert fresh.nested_absmax is not None
    assert torch.equal(fresh.to_linear().weight, ours_module.to_linear().weight)
    with pytest.raises(RuntimeError, match="quant_state has shape"):
        NF4Linear(40, 96).load_state_dict(theirs)
    with pytest.raises(RuntimeError, match="Missing key"):
        NF4Linear(96, 40).load_state_dict({"weight": theirs["weight"], "bias": theirs["bias"]})


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_from_linear_trains_bias_only_and_matches_dense(dtype):
    linear = nn.Linear(64, 48).to(dtype)
    layer = NF4Linear.from_linear(linear, blocksize=32)
    dense = layer.to_linear()
    assert dense.weight.dtype == dtype
    x = torch.randn(7, 64, dtype=dtype, requires_grad=True)
    x_dense = x.detach().clone().requires_grad_()
    layer(x).sum().backward()
    dense(x_dense).sum().backward()
    assert layer.weight.grad is None and not layer.weight.requires_grad
    assert rel_error(layer.bias.grad, dense.bias.grad) < 1e-2
    assert rel_error(x.grad, x_dense.grad) < 1e-2


def test_compute_dtype_casts_like_bitsandbytes():
    layer = NF4Linear.from_linear(nn.Linear(64, 32), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 64)
    y = layer(x)
    expected = nf4.matmul(x.bfloat16(), layer.weight, layer.quant_state, layer.bias.bfloat16()).float()
    assert y.dtype == torch.float32 and torch.equal(y, expected)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="torch.nn.Linear"):
        NF4Linear.from_linear(nn.Conv1d(3, 3, 1))
    with pytest.raises(TypeError, match="Linear4bit"):
        NF4Linear.from_bnb(nn.Linear(3, 3))


def tiny_config(kind):
    # intermediate_size a multiple of the blocksize: bitsandbytes' AVX-512 CPU dequantize is wrong otherwise
    common = dict(vocab_size=160, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)


MODELS = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}


@pytest.mark.parametrize("kind", MODELS)
def test_model_quantized_by_bitsandbytes_runs_on_nf4linear(kind, tmp_path):
    torch.manual_seed(0)
    MODELS[kind](tiny_config(kind)).save_pretrained(tmp_path / "dense")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = bnb_standard_layout(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=config,
                                                                     dtype=torch.float32))
    ids = torch.randint(0, 160, (2, 9))
    with torch.no_grad():
        expected = model(ids).logits
    replaced = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, bnb.nn.Linear4bit):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, NF4Linear.from_bnb(module))
            replaced += 1
    assert replaced == 2 * 7
    with torch.no_grad():
        assert rel_error(model(ids).logits, expected) < 1e-5


@pytest.mark.parametrize("kind", MODELS)
def test_quantize_model_saves_checkpoints_bitsandbytes_loads(kind, tmp_path):
    torch.manual_seed(0)
    model = fastft.quantize_model(MODELS[kind](tiny_config(kind)))
    nf4_layers = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert len(nf4_layers) == 2 * 7 and type(model.lm_head) is nn.Linear
    if kind == "qwen2":
        assert model.model.layers[0].self_attn.q_proj.bias is not None
    ids = torch.randint(0, 160, (2, 9))
    with torch.no_grad():
        ours = model(ids).logits
    model.save_pretrained(tmp_path / "q")
    loaded = bnb_standard_layout(AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32))
    assert isinstance(loaded.model.layers[0].mlp.up_proj, bnb.nn.Linear4bit)
    with torch.no_grad():
        assert rel_error(loaded(ids).logits, ours) < 1e-5
    # ... and back: bitsandbytes' state dict loads into a fastft-quantized skeleton with identical weights.
    skeleton = fastft.quantize_model(MODELS[kind](tiny_config(kind)))
    skeleton.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(skeleton(ids).logits, ours)


def test_quantized_model_trains_with_gradients_through_nf4():
    torch.manual_seed(0)
    model = fastft.quantize_model(LlamaForCausalLM(tiny_config("llama")), skip=("lm_head", "o_proj"))
    assert type(model.model.layers[0].self_attn.o_proj) is nn.Linear
    ids = torch.randint(0, 160, (2, 9))
    embeddings = model.get_input_embeddings()
    optimizer = torch.optim.AdamW([embeddings.weight], lr=1e-2)
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(m.weight.grad is None for m in model.modules() if isinstance(m, NF4Linear))
