"""fastft.methods.preference.dpo_loss on per-token log-probabilities vs TRL 1.16's DPOTrainer.compute_loss on the
same model and batch (tiny Llama + LoRA, reference = TRL's copy of the initial adapter): every loss_type, several weighted at once,
ld_alpha, the f-divergences, per-sequence precomputed reference log-probabilities; bad input."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl import DPOConfig, DPOTrainer
from trl.trainer.utils import use_adapter

from conftest import rel_error
from fastft.methods.preference import DPO_LOSS_TYPES, DPOLossConfig, dpo_loss, sequence_logps
from integrations.trl_fixtures import preference_dataset, tiny_llama, tokenizer


@pytest.fixture(scope="module")
def setup():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    args = DPOConfig(output_dir="/tmp/fastft-dpo-test", report_to=[], use_cpu=True, per_device_train_batch_size=4,
                     max_length=32, beta=0.2, label_smoothing=0.1, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_dataset(), processing_class=tokenizer())
    # TRL keeps the initial adapter as the reference ("ref"); move the trained one away from it
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    inputs = next(iter(trainer.get_train_dataloader()))
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    kwargs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], labels=labels,
                  fused_lm_head=True)
    with torch.no_grad():
        policy = model(**kwargs).log_probs
        with use_adapter(model, "ref"):
            ref = model(**kwargs).log_probs
    return trainer, inputs, policy, ref, inputs["completion_mask"][:, 1:]


def trl_loss(trainer, inputs, **settings):
    for name, value in settings.items():
        setattr(trainer, name, value)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, copy.copy(inputs))
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    trainer._metrics["train"].clear()
    return loss, metrics


@pytest.mark.parametrize("loss_type", DPO_LOSS_TYPES)
def test_each_loss_type_matches_trl(setup, loss_type):
    trainer, inputs, policy, ref, mask = setup
    expected, their_metrics = trl_loss(trainer, inputs, loss_types=[loss_type], loss_weights=[1.0])
    ours, metrics = dpo_loss(policy, ref, mask, DPOLossConfig(beta=0.2, loss_type=[loss_type], label_smoothing=0.1))
    assert rel_error(ours, expected) < 1e-5
    for key, value in metrics.items():
        assert abs(float(value) - their_metrics[key]) <= 1e-5 * max(1.0, abs(their_metrics[key])), key


def test_weighted_ld_alpha_f_divergence_and_precomputed_reference(setup):
    trainer, inputs, policy, ref, mask = setup
    for divergence in ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence"):
        settings = dict(loss_types=["sigmoid", "sft", "ipo"], loss_weights=[0.8, 0.2, 0.5], ld_alpha=0.5,
                        f_divergence_type=divergence, f_alpha_divergence_coef=0.5)
        expected, _ = trl_loss(trainer, inputs, **settings)
        config = DPOLossConfig(beta=0.2, loss_type=["sigmoid", "sft", "ipo"], loss_weights=[0.8, 0.2, 0.5],
                               ld_alpha=0.5, f_divergence_type=divergence, f_alpha_divergence_coef=0.5)
        assert rel_error(dpo_loss(policy, ref, mask, config)[0], expected) < 1e-5, divergence
        precomputed = sequence_logps(ref, mask.float(), 0.5)
        assert rel_error(dpo_loss(policy, precomputed, mask, config)[0], expected) < 1e-5
    trl_loss(trainer, inputs, ld_alpha=None, f_divergence_type="reverse_kl", loss_types=["sigmoid"], loss_weights=[1.0])


def test_bad_input(setup):
    _, _, policy, ref, mask = setup
    config = DPOLossConfig()
    with pytest.raises(ValueError, match="policy_token_logps must be"):
        dpo_loss(policy[:-1], ref[:-1], mask[:-1], config)
    with pytest.raises(ValueError, match="mask must have the shape"):
        dpo_loss(policy, ref, mask[:, :-1], config)
    with pytest.raises(ValueError, match="ref_logps must be"):
        dpo_loss(policy, ref[:, :-1], mask, config)
    with pytest.raises(ValueError, match="beta must be"):
        DPOLossConfig(beta=0.0)
    with pytest.raises(ValueError, match="loss_type must be"):
        DPOLossConfig(loss_type=["kto"])
    with pytest.raises(ValueError, match="loss_weights must have"):
        DPOLossConfig(loss_type=["sigmoid", "hinge"], loss_weights=[1.0])
    with pytest.raises(ValueError, match="exo_pair"):
        DPOLossConfig(loss_type=["exo_pair"])
