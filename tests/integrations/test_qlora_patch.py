"""fastft.patch on QLoRA (peft lora.Linear4bit over bitsandbytes 4-bit layers) and on plain 4-bit models,
and a patched model under transformers' Trainer."""

import bitsandbytes as bnb
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import bnb as peft_bnb
from torch.utils.data import Dataset
from transformers import (AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig, LlamaForCausalLM, Trainer,
                          TrainingArguments)

import fastft
from fastft.nn import NF4Linear
from conftest import bnb_standard_layout, rel_error, repack_for_bnb_cpu_kernel
from test_lora_patch import VOCAB, batch, lora_config, losses_over_steps, outputs


def four_bit_llama(tmp_path, double_quant=True):
    """A 4-bit Llama loaded by transformers + bitsandbytes, kept on bitsandbytes' standard layout (an oracle)."""
    if not (tmp_path / "dense" / "config.json").exists():
        torch.manual_seed(0)  # intermediate_size a multiple of 64: bitsandbytes' AVX-512 dequantize is wrong otherwise
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                                      bnb_4bit_compute_dtype=torch.float32)
    return bnb_standard_layout(AutoModelForCausalLM.from_pretrained(tmp_path / "dense", quantization_config=quantization,
                                                                    dtype=torch.float32))


def test_qlora_training_matches_peft_with_bitsandbytes(tmp_path):
    models = []
    for _ in range(2):
        base = four_bit_llama(tmp_path)
        torch.manual_seed(1)  # the same adapter init in both
        models.append(get_peft_model(base, lora_config("llama")))
    reference, patched = models
    report = fastft.patch(patched)
    assert report.fused["lora.Linear4bit"] == 14 and not report.unfused
    assert all(type(m) is not peft_bnb.Linear4bit for m in patched.modules())
    assert torch.allclose(outputs(patched), outputs(reference), rtol=1e-5, atol=1e-6)
    ours, theirs = losses_over_steps(patched, 30), losses_over_steps(reference, 30)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b)
    assert fastft.unpatch(patched) == 14
    assert sum(type(m) is peft_bnb.Linear4bit for m in patched.modules()) == 14


def test_the_qlora_recipe_with_reentrant_checkpointing_gives_peft_gradients(tmp_path):
    """peft's prepare_model_for_kbit_training (reentrant gradient checkpointing, inputs requiring grad): the patched
    model's loss and adapter gradients equal peft's (dropout masks replaying under checkpointing: test_lora_patch)."""
    from peft import prepare_model_for_kbit_training

    models = []
    for _ in range(2):
        base = prepare_model_for_kbit_training(four_bit_llama(tmp_path))
        torch.manual_seed(1)
        models.append(get_peft_model(base, lora_config("llama")))
    reference, patched = models
    assert patched.base_model.model.is_gradient_checkpointing
    assert fastft.patch(patched).fused["lora.Linear4bit"] == 14
    ids = batch(3)
    losses = []
    for model in (reference, patched):
        torch.manual_seed(5)
        losses.append(model(input_ids=ids, labels=ids).loss)
        losses[-1].backward()
    assert torch.allclose(losses[1], losses[0], rtol=1e-6)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert len(grads) == 28
    for name, param in patched.named_parameters():
        if param.grad is not None:
            assert torch.allclose(param.grad, grads[name], rtol=1e-4, atol=1e-6), name


def test_a_qlora_model_evaluated_before_patch_is_fused_and_trains_as_peft(tmp_path):
    """On AVX512_BF16 CPUs an eval-mode forward without gradients makes bitsandbytes repack every 4-bit weight for
    its CPU kernel; that repack is called directly here, so this runs on every CPU. fastft.patch still fuses every
    layer (converting the weights back with bitsandbytes' inverse), and the model gives the outputs and training
    losses of peft on the same weights converted back by bitsandbytes itself (its state_dict does that)."""
    models = []
    for _ in range(2):
        base = four_bit_llama(tmp_path)
        assert repack_for_bnb_cpu_kernel(base) == 14
        torch.manual_seed(1)
        models.append(get_peft_model(base, lora_config("llama")))
    reference, patched = models
    reference.state_dict()  # bitsandbytes converts its weights back to the standard layout here
    assert not any(getattr(m.weight, "quant_state", None) is not None and m.weight.quant_state.packing_format_for_cpu
                   for m in reference.modules() if isinstance(m, bnb.nn.Linear4bit))
    report = fastft.patch(patched)
    assert report.fused["lora.Linear4bit"] == 14 and not report.unfused
    assert torch.allclose(outputs(patched), outputs(reference), rtol=1e-5, atol=1e-6)
    ours, theirs = losses_over_steps(patched, 10), losses_over_steps(reference, 10)
    for a, b in zip(ours, theirs):
        assert abs(a - b) <= 1e-5 * abs(b)


def test_plain_4bit_model_evaluated_before_patch_runs_on_nf4linear(tmp_path):
    model = four_bit_llama(tmp_path)
    expected = outputs(model)
    repack_for_bnb_cpu_kernel(model)
    assert fastft.patch(model).fused["bnb.Linear4bit -> NF4Linear"] == 14
    assert rel_error(outputs(model), expected) < 1e-2  # the repack rounded every absmax to bf16


def test_plain_4bit_model_runs_on_nf4linear_and_unpatches(tmp_path):
    model = four_bit_llama(tmp_path)
    expected = outputs(model)
    keys = list(model.state_dict())
    report = fastft.patch(model)
    assert report.fused["bnb.Linear4bit -> NF4Linear"] == 14
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 14
    assert list(model.state_dict()) == keys
    assert torch.allclose(outputs(model), expected, rtol=1e-5, atol=1e-6)
    assert fastft.unpatch(model) == 14
    assert sum(type(m) is bnb.nn.Linear4bit for m in model.modules()) == 14


class TokenDataset(Dataset):
    def __len__(self):
        return 16

    def __getitem__(self, index):
        ids = batch(index)[0]
        return {"input_ids": ids, "labels": ids}


def test_trainer_runs_a_patched_model_unmodified(tmp_path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1,
                                                                target_modules="all-linear"))
    fastft.patch(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=4,
                             learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[],
                             use_cpu=True, dataloader_num_workers=0)
    result = Trainer(model=model, args=args, train_dataset=TokenDataset()).train()
    assert result.global_step == 4 and torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert len(changed) == len(before)


def test_bf16_qlora_matches_peft():
    """A bf16 model with a bf16-compute 4-bit base and fp32 adapters (peft's default autocast of adapter weights):
    the same loss and logits as peft, and gradients within bf16 rounding. They are not bit-equal: fastft sums the
    fp32 LoRA input gradients of q/k/v (gate/up) before the one cast to bf16, where peft casts each and adds them in
    bf16, and that rounding propagates to earlier layers."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        LlamaForCausalLM(config).save_pretrained(Path(folder))
        quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                          bnb_4bit_compute_dtype=torch.bfloat16)
        models = []
        for _ in range(2):
            base = bnb_standard_layout(AutoModelForCausalLM.from_pretrained(folder, quantization_config=quantization,
                                                                            dtype=torch.bfloat16))
            torch.manual_seed(1)
            models.append(get_peft_model(base, lora_config("llama")))
    reference, patched = models
    assert patched.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    assert fastft.patch(patched).fused["lora.Linear4bit"] == 14
    ids = batch(2)
    ours, theirs = patched(input_ids=ids, labels=ids), reference(input_ids=ids, labels=ids)
    assert torch.equal(ours.logits, theirs.logits) and torch.equal(ours.loss, theirs.loss)
    ours.loss.backward()
    theirs.loss.backward()
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, param in patched.named_parameters():
        if param.grad is not None:
            assert (param.grad - grads[name]).abs().max() <= 3e-2 * grads[name].abs().max(), name


def test_patch_keeps_bitsandbytes_from_repacking_the_weights_it_fuses(tmp_path):
    """Calls that stay on bitsandbytes' forward (adapters disabled, eval, no gradient: where bitsandbytes repacks on
    AVX512_BF16 CPUs) leave the fused layers' weights in the standard layout; unpatch gives bitsandbytes its
    setting back."""
    base = four_bit_llama(tmp_path)
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = True  # as bitsandbytes sets it on such a CPU
    model = get_peft_model(base, lora_config("llama"))
    assert fastft.patch(model).fused["lora.Linear4bit"] == 14
    with model.disable_adapter():
        outputs(model)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    assert not any(m.support_avx512bf16_for_cpu for m in layers)
    fastft.unpatch(model)
    assert all(m.support_avx512bf16_for_cpu for m in layers)
