"""fastft.patch(trainer) on TRL 1.16's SFTTrainer, DPOTrainer, GRPOTrainer, KTOTrainer and RLOOTrainer with a peft
LoRA model (tiny Llama): TRL's fused LM head is replaced by fastft's (fastft::fused_linear_logprobs), and the
trainer's compute_loss gives the same loss, gradients and logged metrics as TRL alone (fp32, 1e-5 relative), for
every DPO, GRPO and KTO loss type."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from datasets import Dataset
from trl import (DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, KTOConfig, KTOTrainer, RLOOConfig, RLOOTrainer,
                 SFTConfig, SFTTrainer)

import fastft
from conftest import rel_error
from fastft.integrations.trl import TrainerPatchReport
from trl_fixtures import grpo_inputs, preference_dataset, sentence, text_dataset, tiny_llama, tokenizer

DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
COMMON = dict(output_dir="/tmp/fastft-trl-test", report_to=[], use_cpu=True, per_device_train_batch_size=2,
              logging_steps=1, save_strategy="no", bf16=False, dataloader_num_workers=0)


def lora_model(seed=0):
    return get_peft_model(tiny_llama(seed), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       lora_dropout=0.0))


def loss_and_grads(trainer, inputs, compute=None):
    trainer.model.zero_grad()
    loss = (compute or trainer.compute_loss)(trainer.model, copy.copy(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def last_metrics(trainer):
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    trainer._metrics["train"].clear()
    return metrics


def assert_same(trl_run, fastft_run):
    (loss, grads), (ours, our_grads) = trl_run, fastft_run
    assert torch.isfinite(ours) and rel_error(ours, loss) < 1e-5
    assert grads.keys() == our_grads.keys()
    for name in grads:
        assert rel_error(our_grads[name], grads[name]) < 1e-5, name


def assert_same_metrics(theirs, ours, skip=("num_tokens",)):
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        if key not in skip:
            assert abs(ours[key] - value) <= 1e-5 * max(1.0, abs(value)), key


def compare_patched(trainer, inputs, compute=None):
    """(TRL alone, patched) loss and gradients and the metrics each logged."""
    trainer.model.train()
    theirs = loss_and_grads(trainer, inputs, compute)
    their_metrics = last_metrics(trainer)
    report = fastft.patch(trainer)
    try:
        assert isinstance(report, TrainerPatchReport) and report.fused_heads == 1, str(report)
        ours = loss_and_grads(trainer, inputs, compute)
        our_metrics = last_metrics(trainer)
    finally:
        fastft.unpatch(trainer)
    assert_same(theirs, ours)
    return their_metrics, our_metrics


@pytest.fixture(scope="module")
def dpo_trainer():
    args = DPOConfig(**COMMON, max_length=32, beta=0.2, label_smoothing=0.1)
    trainer = DPOTrainer(model=lora_model(), args=args, train_dataset=preference_dataset(),
                         processing_class=tokenizer())
    inputs = next(iter(trainer.get_train_dataloader()))
    return trainer, inputs


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_dpo_loss_types_match_trl(dpo_trainer, loss_type):
    trainer, inputs = dpo_trainer
    trainer.loss_types, trainer.loss_weights = [loss_type], [1.0]
    assert_same_metrics(*compare_patched(trainer, inputs))


def test_dpo_several_loss_types_weighted_and_ld_alpha(dpo_trainer):
    trainer, inputs = dpo_trainer
    trainer.loss_types, trainer.loss_weights = ["sigmoid", "sft", "bco_pair"], [0.8, 0.2, 1.0]
    trainer.ld_alpha = 0.5
    try:
        theirs = loss_and_grads(trainer, inputs)
        fastft.patch(trainer)
        ours = loss_and_grads(trainer, inputs)
    finally:
        fastft.unpatch(trainer)
        trainer.ld_alpha = None
    assert_same(theirs, ours)


def test_dpo_f_divergences(dpo_trainer):
    trainer, inputs = dpo_trainer
    trainer.loss_types, trainer.loss_weights = ["sigmoid"], [1.0]
    for divergence in ("forward_kl", "js_divergence", "alpha_divergence"):
        trainer.f_divergence_type = divergence
        try:
            theirs = loss_and_grads(trainer, inputs)
            fastft.patch(trainer)
            ours = loss_and_grads(trainer, inputs)
        finally:
            fastft.unpatch(trainer)
            trainer.f_divergence_type = "reverse_kl"
        assert_same(theirs, ours)


def test_dpo_reference_model_and_report(dpo_trainer):
    """A separate reference model gets fastft's head too; use_weighting (log_sum_sq_probs) stays on TRL's head and
    the report says so; fused_loss=True on the model alone reports that TRL's head overrides it."""
    args = DPOConfig(**COMMON, max_length=32, use_weighting=True)
    trainer = DPOTrainer(model=tiny_llama(1), ref_model=tiny_llama(2), args=args,
                         train_dataset=preference_dataset(4), processing_class=tokenizer())
    model_report = fastft.patch(trainer.model, fused_loss=True)
    assert any("TRL's fused LM head" in reason for reason in model_report.unfused.values()), str(model_report)
    fastft.unpatch(trainer.model)
    report = fastft.patch(trainer)
    states = list(report.heads.values())
    assert states[0].startswith("TRL's fused head runs") and "use_weighting" in states[0]
    assert states[1] == "fastft::fused_linear_logprobs"
    assert "1 of 2" in str(report)
    fastft.unpatch(trainer)
    assert "_fastft_trl_head" not in trainer.ref_model.__dict__


@pytest.fixture(scope="module")
def grpo_trainer():
    args = GRPOConfig(**COMMON, num_generations=2, max_completion_length=8, beta=0.04, temperature=0.7,
                      entropy_coef=0.01, top_entropy_quantile=0.5)
    trainer = GRPOTrainer(model=lora_model(), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=text_dataset(), processing_class=tokenizer())
    trainer.current_gradient_accumulation_steps = 2  # what Trainer.training_step sets under accumulation
    return trainer, grpo_inputs(trainer, torch.Generator().manual_seed(0))


# every loss type at token level (the default) except the sequence-level ones; GSPO (grpo at sequence level) too
GRPO_CASES = [(t, "sequence" if t in ("luspo", "vespo") else "token") for t in GRPO_LOSS_TYPES] + [("grpo", "sequence")]


@pytest.mark.parametrize("loss_type, level", GRPO_CASES)
def test_grpo_loss_types_match_trl(grpo_trainer, loss_type, level):
    """Temperature 0.7, KL to the reference (beta), clipping, entropy bonus and entropy masking, both importance
    sampling levels."""
    trainer, inputs = grpo_trainer
    trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    trainer.model.train()
    compute = trainer._compute_loss
    theirs = loss_and_grads(trainer, inputs, compute)
    report = fastft.patch(trainer)
    try:
        assert report.fused_heads == 1, str(report)
        ours = loss_and_grads(trainer, inputs, compute)
    finally:
        fastft.unpatch(trainer)
    assert_same(theirs, ours)


def test_sft_matches_trl_and_accumulates():
    args = SFTConfig(**COMMON, max_length=32, gradient_accumulation_steps=2)
    trainer = SFTTrainer(model=lora_model(), args=args, train_dataset=text_dataset(),
                         processing_class=tokenizer())
    inputs = next(iter(trainer.get_train_dataloader()))
    count = (inputs["labels"][:, 1:] != -100).sum()
    run = lambda: loss_and_grads(trainer, inputs, lambda m, i: trainer.compute_loss(  # noqa: E731
        m, i, num_items_in_batch=2 * count))
    theirs = run()
    their_metrics = last_metrics(trainer)
    report = fastft.patch(trainer, fused_loss=True)
    try:
        assert report.fused_heads == 1, str(report)
        ours = run()
        our_metrics = last_metrics(trainer)
    finally:
        fastft.unpatch(trainer)
    assert_same(theirs, ours)
    for key in ("entropy", "mean_token_accuracy"):
        assert abs(our_metrics[key] - their_metrics[key]) <= 1e-5 * max(1.0, abs(their_metrics[key])), key


@pytest.fixture(scope="module")
def kto_trainer():
    g = torch.Generator().manual_seed(1)
    rows = [{"prompt": sentence(g, 3, 9) + " ", "completion": sentence(g, 2, 7), "label": bool(i % 3)}
            for i in range(8)]
    args = KTOConfig(**{**COMMON, "per_device_train_batch_size": 4}, max_length=32, beta=0.2, desirable_weight=1.3)
    trainer = KTOTrainer(model=lora_model(), args=args, train_dataset=Dataset.from_list(rows),
                         processing_class=tokenizer())
    return trainer, next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(kto_trainer, loss_type):
    """KTO's reference pass (the "ref" adapter) and KL-estimate passes run on fastft's head too; the logged
    logits/chosen and logits/rejected (mean logits) and entropy keep their values."""
    trainer, inputs = kto_trainer
    trainer.loss_type, trainer.calculate_KL = loss_type, loss_type == "kto"
    their_metrics, our_metrics = compare_patched(trainer, inputs)
    assert {"logits/chosen", "logits/rejected", "entropy", "kl"} <= their_metrics.keys()
    assert_same_metrics(their_metrics, our_metrics)


def test_rloo_matches_trl():
    args = RLOOConfig(**COMMON, num_generations=2, max_completion_length=8, temperature=0.7, epsilon_high=0.28)
    trainer = RLOOTrainer(model=lora_model(), reward_funcs=lambda completions, **_: [0.0] * len(completions),
                          args=args, train_dataset=text_dataset(), processing_class=tokenizer())
    g = torch.Generator().manual_seed(2)
    inputs = grpo_inputs(trainer, g)
    mask = inputs["completion_mask"]
    inputs["old_logps"] = (inputs.pop("old_per_token_logps") * mask).sum(1) + 0.2 * torch.randn(4, generator=g)
    del inputs["ref_per_token_logps"]
    their_metrics, our_metrics = compare_patched(trainer, inputs, trainer._compute_loss)
    assert_same_metrics(their_metrics, our_metrics)
