"""The decode path of patched LoRA layers (fastft/integrations/peft_decode.py): calls of <= 16 rows under no grad
give peft's outputs on dense and bitsandbytes 4-bit bases, see every change of peft's state between calls, and
leave every call it does not cover (grad mode, dropout in training, more rows) to the general path."""

import copy

import pytest
import torch
from peft.tuners.lora import LoraLayer

import fastft
from fastft.integrations import peft_decode
from test_lora_patch import VOCAB, assert_close, peft_pair
from test_qlora_patch import four_bit_llama


@pytest.fixture
def decode_calls(monkeypatch):
    """How many layer calls the decode path served (dense, 4-bit)."""
    served = {"dense": 0, "4bit": 0}
    for kind, name in (("dense", "dense_forward"), ("4bit", "linear4bit_forward")):
        real = getattr(peft_decode, name)

        def counted(layer, x, real=real, kind=kind):
            out = real(layer, x)
            served[kind] += out is not None
            return out

        monkeypatch.setattr(peft_decode, name, counted)
    return served


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def ids(batch, length, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_decode_steps_give_peft_outputs_and_tokens(decode_calls):
    reference, patched = peft_pair(lora_bias=True)
    fastft.patch(patched)
    for model in (reference, patched):
        model.eval()
    for batch, length in ((1, 1), (2, 5), (4, 4)):  # 1, 10 and 16 rows
        assert_close(logits(patched, ids(batch, length)), logits(reference, ids(batch, length)))
    assert decode_calls["dense"] == 3 * 14
    prompt = ids(1, 6, seed=1)
    generated = [m.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8,
                            min_new_tokens=8, do_sample=False) for m in (reference, patched)]
    assert torch.equal(generated[0], generated[1])
    decode_calls["dense"] = 0
    assert_close(logits(patched, ids(2, 9)), logits(reference, ids(2, 9)))  # 18 rows: the general path
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: the general path (peft's casts)
        assert torch.allclose(logits(patched, ids(1, 2)), logits(reference, ids(1, 2)), rtol=2e-2, atol=2e-2)
    with torch.enable_grad():
        patched(input_ids=ids(1, 3)).logits.sum().backward()  # autograd: the general path
    assert decode_calls["dense"] == 0


def test_changes_of_peft_state_between_calls_are_seen(decode_calls):
    reference, _ = peft_pair()
    reference.add_adapter("other", copy.deepcopy(reference.peft_config["default"]))
    reference.eval()
    patched = copy.deepcopy(reference)
    fastft.patch(patched)
    x = ids(1, 3)

    def check():
        assert_close(logits(patched, x), logits(reference, x))

    check()
    for model in (reference, patched):
        model.set_adapter("other")
    check()
    for model in (reference, patched):
        model.base_model.set_adapter(["default", "other"])
    check()
    for model in (reference, patched):
        for module in model.modules():
            if isinstance(module, LoraLayer):
                module.scaling["other"] *= 3.0
        with torch.no_grad():
            model.base_model.model.model.layers[1].mlp.down_proj.lora_B["default"].weight.mul_(-2.0)
    check()
    served = decode_calls["dense"]
    assert served == 4 * 14
    for model in (reference, patched):
        model.train()  # lora_dropout 0: nn.Identity, still covered
    check()
    assert decode_calls["dense"] == served + 14
    with reference.disable_adapter(), patched.disable_adapter():
        check()
    assert decode_calls["dense"] == served + 14  # adapters disabled: the general path


def test_dropout_in_training_mode_leaves_the_decode_path(decode_calls):
    reference, patched = peft_pair(dropout=0.1)
    fastft.patch(patched)
    x = ids(1, 2)
    patched.eval()
    reference.eval()
    assert_close(logits(patched, x), logits(reference, x))
    assert decode_calls["dense"] == 14
    patched.train()
    logits(patched, x)
    assert decode_calls["dense"] == 14


@pytest.mark.parametrize("double_quant", (False, True))
def test_4bit_decode_steps_give_bitsandbytes_outputs(tmp_path, decode_calls, double_quant):
    from peft import get_peft_model

    from test_lora_patch import lora_config

    models = []
    for _ in range(2):
        base = four_bit_llama(tmp_path, double_quant)
        torch.manual_seed(1)
        models.append(get_peft_model(base, lora_config("llama")).eval())
    reference, patched = models  # reference: bitsandbytes' standard layout (fp32 compute), the oracle
    fastft.patch(patched)
    for batch, length in ((1, 1), (2, 8)):
        ours, theirs = logits(patched, ids(batch, length)), logits(reference, ids(batch, length))
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    assert decode_calls["4bit"] == 2 * 14
