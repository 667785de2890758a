"""fastft.patch on real peft models (random-init transformers models from small configs): peft's contract."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import layer as peft_lora
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM)

import fastft
from conftest import causal_lm_losses

VOCAB = 128


def base_model(kind):
    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(LlamaConfig(**common)) if kind == "llama" else Qwen2ForCausalLM(Qwen2Config(**common))


def lora_config(kind, dropout=0.0, **extra):
    targets = ["c_attn", "c_proj", "c_fc"] if kind == "gpt2" else "all-linear"
    return LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=targets, init_lora_weights=False,
                      fan_in_fan_out=kind == "gpt2", **extra)


def peft_pair(kind="llama", dropout=0.0, **extra):
    model = get_peft_model(base_model(kind), lora_config(kind, dropout, **extra))
    return model, copy.deepcopy(model)


def batch(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (2, 12), generator=generator)


def losses_over_steps(model, steps):
    return causal_lm_losses(model, batch, steps)


@pytest.mark.parametrize("kind", ("llama", "qwen2", "gpt2"))
def test_patched_training_matches_peft(kind):
    reference, patched = peft_pair(kind)
    report = fastft.patch(patched)
    expected_layers = {"llama": 14, "qwen2": 14, "gpt2": 8}[kind]  # gpt2: c_attn, c_fc and two c_proj per block
    assert report.fused["lora.Linear"] == expected_layers and not report.unfused
    ours, theirs = losses_over_steps(patched, 30), losses_over_steps(reference, 30)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b)
    trained = dict(reference.named_parameters())
    for name, param in patched.named_parameters():
        if param.requires_grad:
            assert torch.allclose(param, trained[name], rtol=1e-5, atol=1e-6), name


def outputs(model, **kwargs):
    ids = batch(99)
    with torch.no_grad():
        return model(input_ids=ids, **kwargs).logits


def test_peft_contract_is_kept():
    reference, patched = peft_pair()
    params_before = [(n, p.data_ptr()) for n, p in patched.named_parameters()]
    buffers_before = [n for n, _ in patched.named_buffers()]
    report = fastft.patch(patched)
    assert "fused 14 module(s)" in str(report) and "lora.Linear: 14" in str(report)
    assert [(n, p.data_ptr()) for n, p in patched.named_parameters()] == params_before
    assert [n for n, _ in patched.named_buffers()] == buffers_before
    assert torch.equal(outputs(patched), outputs(reference))

    for model in (reference, patched):  # several adapters active at once, and scaling changed at run time
        torch.manual_seed(1)  # the same random init of the new adapter in both
        model.add_adapter("second", lora_config("llama"))
        model.base_model.set_adapter(["default", "second"])
    fastft.patch(patched)  # new adapter layers are already the patched instances
    assert torch.equal(outputs(patched), outputs(reference))
    for model in (reference, patched):
        for module in model.modules():
            if isinstance(module, peft_lora.LoraLayer):
                module.scaling["second"] = 0.3
    assert torch.equal(outputs(patched), outputs(reference))
    mixed = ["default", "second"]  # one adapter per sample: peft's mixed-batch path (eval only)
    for model in (reference, patched):
        model.eval()
    assert torch.equal(outputs(patched, adapter_names=mixed), outputs(reference, adapter_names=mixed))
    for model in (reference, patched):
        with model.disable_adapter():
            disabled = outputs(model)
    assert torch.equal(disabled, outputs(base_model("llama")))
    for model in (reference, patched):
        model.base_model.set_adapter("default")
        model.merge_adapter()
    assert torch.allclose(outputs(patched), outputs(reference))
    for model in (reference, patched):
        model.unmerge_adapter()
    assert torch.allclose(outputs(patched), outputs(reference), atol=1e-6)


def test_saved_adapter_is_unchanged_and_loads_in_plain_peft(tmp_path):
    reference, patched = peft_pair()
    fastft.patch(patched)
    reference.save_pretrained(tmp_path / "reference")
    patched.save_pretrained(tmp_path / "patched")
    ref_bytes = (tmp_path / "reference" / "adapter_model.safetensors").read_bytes()
    assert (tmp_path / "patched" / "adapter_model.safetensors").read_bytes() == ref_bytes
    loaded = PeftModel.from_pretrained(base_model("llama"), tmp_path / "patched")
    assert all(type(m) is not fastft.integrations.peft._FUSED_CLASSES.get(type(m), object)
               for m in loaded.modules())
    assert torch.equal(outputs(loaded), outputs(patched))
    merged = patched.merge_and_unload()
    assert not any(isinstance(m, peft_lora.LoraLayer) for m in merged.modules())
    assert torch.allclose(outputs(merged), outputs(loaded), atol=1e-5)


def test_patch_is_per_instance_and_reversible():
    reference, patched = peft_pair()
    other = get_peft_model(base_model("llama"), lora_config("llama"))
    fastft.patch(patched)
    assert all(type(m) is peft_lora.Linear for m in other.modules() if isinstance(m, peft_lora.LoraLayer))
    assert fastft.unpatch(patched) == 14
    assert all(type(m) is peft_lora.Linear for m in patched.modules() if isinstance(m, peft_lora.LoraLayer))
    assert torch.equal(outputs(patched), outputs(reference))


def test_dora_is_reported_and_runs_peft_forward():
    reference, patched = peft_pair(use_dora=True)
    report = fastft.patch(patched)
    assert sum(report.fused.values()) == 0 and len(report.unfused) == 14
    assert all("DoRA" in reason or "variant" in reason for reason in report.unfused.values())
    assert torch.equal(outputs(patched), outputs(reference))


def test_dropout_is_off_in_eval_and_replays_under_checkpointing():
    reference, patched = peft_pair(dropout=0.2)
    fastft.patch(patched)
    patched.eval()
    reference.eval()
    assert torch.equal(outputs(patched), outputs(reference))
    patched.train()
    ids = batch(5)
    torch.manual_seed(123)
    plain = patched(input_ids=ids, labels=ids).loss
    plain.backward()
    grads = {n: p.grad.clone() for n, p in patched.named_parameters() if p.grad is not None}
    patched.zero_grad()
    patched.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(123)
    checkpointed = patched(input_ids=ids, labels=ids).loss
    checkpointed.backward()
    assert checkpointed.item() == plain.item()
    for name, grad in grads.items():
        assert torch.allclose(dict(patched.named_parameters())[name].grad, grad, rtol=1e-6, atol=1e-7), name
    torch.manual_seed(124)
    assert patched(input_ids=ids, labels=ids).loss.item() != plain.item()  # a new step draws new masks


def test_transformers_add_adapter_models_are_patched():
    reference = base_model("llama")
    torch.manual_seed(2)
    reference.add_adapter(lora_config("llama"))
    patched = copy.deepcopy(reference)
    report = fastft.patch(patched)
    assert report.fused["lora.Linear"] == 14
    ids = batch(3)
    reference(input_ids=ids, labels=ids).loss.backward()
    patched(input_ids=ids, labels=ids).loss.backward()
    assert torch.equal(outputs(patched), outputs(reference))
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert grads and all(torch.allclose(p.grad, grads[n], rtol=1e-6, atol=1e-8)
                         for n, p in patched.named_parameters() if p.grad is not None)
