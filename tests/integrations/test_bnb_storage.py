"""A patched QLoRA model through any order of eval / train / disable_adapter / unpatch / generate / patch: fastft
always reads the storage bitsandbytes holds, and its outputs are bitsandbytes' own.

bitsandbytes 0.50 repacks a 4-bit weight in place for its CPU kernel (tiles of codes, bf16 block scales, double
quant dropped, same QuantState object) in eval-mode forwards without gradient on AVX512_BF16 CPUs. These tests force
that path on every CPU (`support_avx512bf16_for_cpu = True`, the attribute bitsandbytes sets from the CPU's flags;
the repack itself is plain torch) and assert that it happened; bitsandbytes' outputs on the repacked layout are
compared only where its bf16 kernel exists (elsewhere its fallback kernel cannot read that layout)."""

import bitsandbytes as bnb
import pytest
import torch
from bitsandbytes.functional import dequantize_4bit, has_avx512bf16
from peft import get_peft_model
from torch.utils._python_dispatch import TorchDispatchMode

import fastft
from conftest import bnb_standard_layout, causal_lm_losses
from fastft import nf4
from fastft.integrations.bnb import nf4_state
from test_lora_patch import VOCAB, batch, lora_config
from test_qlora_patch import four_bit_llama

BF16_LOGITS = 2e-2  # bitsandbytes' CPU kernel computes in bf16 (inputs and block scales rounded: 2 x 2^-8 each)


class OpCounter(TorchDispatchMode):
    """Counts the calls of each op (by its namespace::name) that run below autograd."""

    def __init__(self):
        super().__init__()
        self.counts = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        self.counts[name] = self.counts.get(name, 0) + 1
        return func(*args, **(kwargs or {}))

    def calls(self, prefix: str) -> int:
        return sum(count for name, count in self.counts.items() if name.startswith(prefix))


def four_bit_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]


def peft_models(tmp_path, double_quant):
    """(oracle, patched-to-be): the same QLoRA model twice; the oracle stays on bitsandbytes' standard layout, the
    other takes the repack path of AVX512_BF16 CPUs on every CPU."""
    models = []
    for _ in range(2):
        base = four_bit_llama(tmp_path, double_quant=double_quant)
        torch.manual_seed(1)
        models.append(get_peft_model(base, lora_config("llama")))
    for layer in four_bit_layers(models[1]):
        layer.support_avx512bf16_for_cpu = True
    return models


def repacked(model) -> list[bool]:
    return [bool(getattr(m.weight.quant_state, "packing_format_for_cpu", False)) for m in four_bit_layers(model)]


def assert_reads_bitsandbytes_storage(model):
    """Every 4-bit layer: the state fastft reads dequantizes bit for bit to what bitsandbytes dequantizes from its
    current (standard-layout) storage."""
    for layer in four_bit_layers(model):
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)
        ours = nf4.dequantize(nf4.packed_bytes(layer.weight.data), nf4_state(layer), torch.float32)
        theirs = dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        assert torch.equal(ours, theirs)


def assert_same_statistics(ours, theirs):
    """The 4-bit layers of two models hold equal codes and statistics."""
    for a, b in zip(four_bit_layers(ours), four_bit_layers(theirs), strict=True):
        assert torch.equal(a.weight.data, b.weight.data)
        qa, qb = a.weight.quant_state, b.weight.quant_state
        assert qa.nested == qb.nested and torch.equal(qa.absmax, qb.absmax)
        if qa.nested:
            assert torch.equal(qa.state2.absmax, qb.state2.absmax) and torch.equal(qa.offset, qb.offset)


def logits(model, disable=False):
    model.eval()
    with torch.no_grad():
        if disable:
            with model.disable_adapter():
                return model(input_ids=batch(7)).logits
        return model(input_ids=batch(7)).logits


def train_steps(model, optimizer):
    """One training step's loss (the optimizer persists across the test's phases)."""
    model.train()
    return causal_lm_losses(model, batch, 1, optimizer=optimizer)


def close(a, b, rel=1e-5):
    return float((a - b).abs().max()) <= rel * float(b.abs().max())


@pytest.mark.parametrize("double_quant", (True, False))
def test_eval_patch_train_disable_adapter_train_unpatch_generate_patch(tmp_path, double_quant):
    oracle, model = peft_models(tmp_path, double_quant)
    adam = {m: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for m in (oracle, model)}

    # eval before patch: bitsandbytes repacks every weight (bf16 block scales)
    expected = logits(oracle)
    outputs = logits(model)
    assert all(repacked(model)) and len(repacked(model)) == 14
    if has_avx512bf16():
        assert close(outputs, expected, BF16_LOGITS)
    # what fastft reads once it converts back is what bitsandbytes' own inverse gives (its state_dict runs it)
    for layer in four_bit_layers(oracle):
        layer.weight.data, layer.weight.quant_state = bnb.functional._convert_weight_packed_for_cpu(
            layer.weight.data, layer.weight.quant_state)
    oracle.state_dict()
    assert not any(repacked(oracle))
    for layer in four_bit_layers(oracle):
        state = layer.weight.quant_state
        if not state.nested:  # the inverse restores double-quantized statistics only: the rest stays transposed bf16
            assert state.absmax.dtype == torch.bfloat16 and state.absmax.dim() == 2
            state.absmax = state.absmax.t().reshape(-1).float()

    report = fastft.patch(model)
    assert report.fused["lora.Linear4bit"] == 14 and not report.unfused and not any(repacked(model))
    assert_same_statistics(model, oracle)
    assert_reads_bitsandbytes_storage(model)
    assert close(logits(model), logits(oracle))

    for a, b in zip(train_steps(model, adam[model]), train_steps(oracle, adam[oracle])):
        assert abs(a - b) <= 1e-5 * abs(b)

    # eval with adapters disabled: the base runs fastft's fused NF4 matmul, bitsandbytes does not repack
    with OpCounter() as ops:
        disabled = logits(model, disable=True)
    assert ops.calls("fastft::nf4_linear") == 14 and ops.calls("bitsandbytes::") == 0
    assert not any(repacked(model))
    assert close(disabled, logits(oracle, disable=True))
    assert_reads_bitsandbytes_storage(model)

    for a, b in zip(train_steps(model, adam[model]), train_steps(oracle, adam[oracle])):
        assert abs(a - b) <= 1e-5 * abs(b)

    # unpatch -> generate on bitsandbytes (which repacks again) -> patch: the statistics come back exactly
    fastft.unpatch(model)
    prompt = batch(3)[:, :4]
    model.eval()
    generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                               do_sample=False)
    assert generated.shape == (2, 8) and all(repacked(model))
    if has_avx512bf16():
        assert close(logits(model), logits(oracle), BF16_LOGITS)
    fastft.patch(model)
    assert not any(repacked(model))
    assert_same_statistics(model, oracle)
    assert_reads_bitsandbytes_storage(model)
    assert close(logits(model), logits(oracle))
    for a, b in zip(train_steps(model, adam[model]), train_steps(oracle, adam[oracle])):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_fastft_follows_bitsandbytes_own_inverse(tmp_path):
    """bitsandbytes converts a repacked weight back itself in state_dict (same QuantState, new statistics: its
    double quant of the bf16 block scales): fastft rebuilds its view from that storage."""
    _, model = peft_models(tmp_path, double_quant=True)
    fastft.patch(model)
    fastft.unpatch(model)
    logits(model)
    assert all(repacked(model))
    model.state_dict()  # bitsandbytes' inverse
    assert not any(repacked(model))
    fastft.patch(model)
    assert_reads_bitsandbytes_storage(model)
    ours = logits(model)
    fastft.unpatch(model)
    assert close(ours, logits(bnb_standard_layout(model)))  # bitsandbytes itself on that storage


def test_a_plain_4bit_model_round_trips_through_bitsandbytes_generate(tmp_path):
    """Plain bitsandbytes 4-bit layers (no LoRA) run as NF4Linear on the same storage; unpatch -> generate on
    bitsandbytes (repack) -> patch gives the same outputs as before, exactly."""
    model = four_bit_llama(tmp_path)
    for layer in four_bit_layers(model):
        layer.support_avx512bf16_for_cpu = True
    assert fastft.patch(model).fused["bnb.Linear4bit -> NF4Linear"] == 14
    before = logits(model)
    fastft.unpatch(model)
    logits(model)
    assert all(repacked(model))
    fastft.patch(model)
    assert torch.equal(logits(model), before)
