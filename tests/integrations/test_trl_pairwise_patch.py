"""fastft.patch(trainer) on TRL 1.16's ORPOTrainer and CPOTrainer (trl.experimental, full logits in
concatenated_forward) with a peft LoRA tiny Llama: compute_loss gives the same loss, gradients and logged metrics
(logits means included) as TRL alone (fp32, 1e-5 relative), for ORPO and CPO (summed and averaged log-probabilities,
with and without the NLL, AlphaPO rewards); unpatch restores
TRL's path; what the patch leaves to TRL is reported."""

import pytest
import torch
from peft import LoraConfig, PromptTuningConfig, get_peft_model
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

import fastft
from conftest import rel_error
from trl_fixtures import preference_dataset, tiny_llama, tokenizer

COMMON = dict(output_dir="/tmp/fastft-trl-pairwise-test", report_to=[], use_cpu=True, per_device_train_batch_size=4,
              max_length=32, bf16=False)


def build(trainer_class, args, peft_config=None):
    peft_config = peft_config or LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                            init_lora_weights=False)
    trainer = trainer_class(model=get_peft_model(tiny_llama(0), peft_config), args=args,
                            train_dataset=preference_dataset(), processing_class=tokenizer())
    trainer.model.train()
    return trainer, next(iter(trainer.get_train_dataloader()))


def run(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    trainer._stored_metrics["train"].clear()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, metrics


def assert_patched_same(trainer, batch):
    loss, grads, metrics = run(trainer, batch)
    report = fastft.patch(trainer)
    try:
        assert report.fused_heads == 1, str(report)
        ours, our_grads, our_metrics = run(trainer, batch)
    finally:
        assert fastft.unpatch(trainer) >= 1
    assert "concatenated_forward" not in trainer.__dict__
    assert torch.isfinite(ours) and rel_error(ours, loss) < 1e-5
    for name, grad in grads.items():
        assert rel_error(our_grads[name], grad) < 1e-5, name
    assert metrics.keys() == our_metrics.keys() and "logits/chosen" in metrics
    for key, value in metrics.items():
        assert abs(our_metrics[key] - value) <= 1e-5 * max(1.0, abs(value)), key


def test_orpo_matches_trl():
    assert_patched_same(*build(ORPOTrainer, ORPOConfig(**COMMON, beta=0.3)))


@pytest.fixture(scope="module")
def cpo_setup():
    return build(CPOTrainer, CPOConfig(**COMMON, beta=0.3, label_smoothing=0.1, simpo_gamma=0.4))


# the patch changes what concatenated_forward returns: summed (sigmoid, hinge) or averaged (ipo, simpo) log-probs,
# with or without the NLL (cpo_alpha); TRL's loss formulas then run unchanged (each is checked standalone in
# tests/methods/test_reference_free.py)
@pytest.mark.parametrize("loss_type, cpo_alpha, alpha", [("sigmoid", 0.5, 0.0), ("ipo", 1.0, 0.0),
                                                         ("simpo", 0.0, 0.2)])
def test_cpo_matches_trl(cpo_setup, loss_type, cpo_alpha, alpha):
    trainer, batch = cpo_setup
    trainer.loss_type, trainer.cpo_alpha, trainer.alpha = loss_type, cpo_alpha, alpha
    trainer.simpo_gamma = 0.4  # CPOTrainer.__init__ sets it only for loss_type "simpo"
    assert_patched_same(trainer, batch)


def test_prompt_learning_left_to_trl():
    trainer, _ = build(ORPOTrainer, ORPOConfig(**COMMON), PromptTuningConfig(task_type="CAUSAL_LM",
                                                                                num_virtual_tokens=2))
    report = fastft.patch(trainer)
    state = next(iter(report.heads.values()))
    assert state.startswith("TRL's logits path runs (prompt learning") and report.fused_heads == 0
    assert "concatenated_forward" not in trainer.__dict__
    fastft.unpatch(trainer)
