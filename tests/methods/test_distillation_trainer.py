"""Distilling a transformers causal LM with the fused loss: hidden states + heads, Trainer, LoRA on lm_head."""

import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, TrainingArguments

from conftest import rel_error
from fastft.integrations.distillation import DistillationTrainer, distillation_loss, head_weight
from fastft.reference.distillation import generalized_jsd_ref

VOCAB = 96


def llama(hidden, seed):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=64))


def materialized_loss(student, teacher, ids, beta, temperature):
    """TRL's formula on the models' own full logits (next-token positions)."""
    s = student(input_ids=ids).logits[:, :-1].float()
    with torch.no_grad():
        t = teacher(input_ids=ids).logits[:, :-1].float()
    return generalized_jsd_ref(s / temperature, t / temperature, beta).mean()


def test_loss_from_hidden_states_equals_loss_from_logits():
    student, teacher = llama(32, 0), llama(48, 1)  # different hidden sizes, same vocabulary
    ids = torch.randint(0, VOCAB, (2, 10))
    ours = distillation_loss(student, teacher, {"input_ids": ids}, beta=0.5, temperature=2.0)
    expected = materialized_loss(student, teacher, ids, 0.5, 2.0)
    assert rel_error(ours, expected) < 1e-5
    ours.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()
    expected.backward()
    for name, param in student.named_parameters():
        assert rel_error(grads[name], param.grad) < 1e-4, name


def test_lora_on_lm_head_trains_through_the_fused_loss():
    teacher = llama(48, 1)
    student = get_peft_model(llama(32, 0), LoraConfig(r=4, lora_alpha=8, target_modules=["lm_head", "q_proj"],
                                                      init_lora_weights=False))
    ids = torch.randint(0, VOCAB, (2, 10))
    weight, _ = head_weight(student.get_output_embeddings())
    assert weight.requires_grad
    ours = distillation_loss(student, teacher, {"input_ids": ids}, beta=0.0)
    expected = materialized_loss(student, teacher, ids, 0.0, 1.0)
    assert rel_error(ours, expected) < 1e-5
    lora_params = [p for n, p in student.named_parameters() if "lm_head" in n and p.requires_grad]
    assert len(lora_params) == 2
    ours_grads = torch.autograd.grad(ours, lora_params)
    expected_grads = torch.autograd.grad(expected, lora_params)
    for a, b in zip(ours_grads, expected_grads):
        assert rel_error(a, b) < 1e-4


class Tokens(Dataset):
    def __len__(self):
        return 32

    def __getitem__(self, index):
        ids = torch.randint(0, VOCAB, (12,), generator=torch.Generator().manual_seed(index))
        return {"input_ids": ids, "labels": ids}


def test_distillation_trainer_reduces_the_loss(tmp_path):
    student, teacher = llama(32, 0), llama(48, 1)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=12,
                             learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True)
    trainer = DistillationTrainer(model=student, teacher=teacher, args=args, train_dataset=Tokens(), beta=0.5,
                                  temperature=2.0, alpha=0.5)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 12 and losses[-1] < losses[0]
    assert all(not p.requires_grad for p in teacher.parameters())


def test_example_script_runs():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[2] / "examples" / "distill_with_trainer.py"
    result = subprocess.run([sys.executable, str(script), "--max-steps", "2", "--vocab", "512"], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "after 2 steps" in result.stdout
