"""fastft.methods.preference.dpo_loss on per-token log-probabilities vs TRL 1.16's DPOTrainer.compute_loss on the
same model and batch (tiny Llama + LoRA, reference = TRL's copy of the initial adapter): every loss_type, several
weighted at once, ld_alpha, the f-divergences, per-sequence precomputed reference log-probabilities; kto_loss vs
KTOTrainer's compute_loss (both loss types, desirable / undesirable weights, the KL estimate; loss, gradients,
metrics); bad input."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from datasets import Dataset
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.trainer.utils import use_adapter

from conftest import rel_error
from fastft.methods.preference import (DPO_LOSS_TYPES, KTO_LOSS_TYPES, DPOLossConfig, KTOLossConfig, dpo_loss,
                                       dpo_loss_from_hidden, head_logps, kto_loss, kto_loss_from_hidden,
                                       sequence_logps)
from integrations.trl_fixtures import preference_dataset, sentence, tiny_llama, tokenizer


def lora_model():
    return get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def move_adapter(model):
    """TRL keeps the initial adapter as the reference ("ref"); move the trained one away from it."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B.default" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def setup():
    model = lora_model()
    args = DPOConfig(output_dir="/tmp/fastft-dpo-test", report_to=[], use_cpu=True, per_device_train_batch_size=4,
                     max_length=32, beta=0.2, label_smoothing=0.1, bf16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=preference_dataset(), processing_class=tokenizer())
    move_adapter(model)
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
    empty = mask.clone()
    empty[1] = 0
    with pytest.raises(ValueError, match=r"mask selects no completion token in rows \[1\]"):
        dpo_loss(policy, ref, empty, config)


def kto_dataset(n: int = 8) -> Dataset:
    g = torch.Generator().manual_seed(1)
    return Dataset.from_list([{"prompt": sentence(g, 3, 9) + " ", "completion": sentence(g, 2, 7),
                               "label": bool(i % 3)} for i in range(n)])


@pytest.fixture(scope="module")
def kto_setup():
    model = lora_model()
    args = KTOConfig(output_dir="/tmp/fastft-kto-test", report_to=[], use_cpu=True, per_device_train_batch_size=4,
                     max_length=32, beta=0.2, bf16=False)
    trainer = KTOTrainer(model=model, args=args, train_dataset=kto_dataset(), processing_class=tokenizer())
    move_adapter(model)
    model.train()
    return trainer, next(iter(trainer.get_train_dataloader()))


def kto_logps(model, inputs, prefix="", grad=False):
    ids, completion = inputs[prefix + "input_ids"], inputs[prefix + "completion_mask"]
    with torch.set_grad_enabled(grad):
        return model(input_ids=ids, attention_mask=inputs[prefix + "attention_mask"], fused_lm_head=True,
                     labels=ids.masked_fill(completion == 0, -100)).log_probs


@pytest.mark.parametrize("loss_type", KTO_LOSS_TYPES)
def test_kto_matches_trl(kto_setup, loss_type):
    trainer, inputs = kto_setup
    model = trainer.model
    trainer.loss_type, trainer.desirable_weight, trainer.undesirable_weight = loss_type, 1.3, 0.7
    trainer.calculate_KL = loss_type == "kto"
    model.zero_grad()
    their_loss = trainer.compute_loss(model, copy.copy(inputs))
    their_loss.backward()
    expected = trainer._metrics["train"]
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    their_metrics = {k: v[-1] for k, v in expected.items() if v}
    expected.clear()
    model.zero_grad()
    with use_adapter(model, "ref"):
        ref, ref_kl = kto_logps(model, inputs), kto_logps(model, inputs, "KL_")
    kl = kto_logps(model, inputs, "KL_")
    config = KTOLossConfig(beta=0.2, loss_type=loss_type, desirable_weight=1.3, undesirable_weight=0.7)
    loss, metrics = kto_loss(kto_logps(model, inputs, grad=True), ref, inputs["label"].bool(), config,
                             mask=inputs["completion_mask"][:, 1:], kl_logps=kl.sum(1), ref_kl_logps=ref_kl.sum(1))
    loss.backward()
    assert torch.isfinite(loss) and rel_error(loss, their_loss) < 1e-5
    for name, grad in grads.items():
        assert rel_error(model.get_parameter(name).grad, grad) < 1e-5, name
    assert metrics.keys() <= their_metrics.keys() and "rewards/margins" in metrics
    for key, value in metrics.items():
        assert abs(float(value) - their_metrics[key]) <= 1e-5 * max(1.0, abs(their_metrics[key])), key


def test_kto_bad_input():
    logps, mask = torch.randn(3, 4), torch.ones(3, 4)
    desirable = torch.tensor([True, False, True])
    config = KTOLossConfig()
    with pytest.raises(ValueError, match="loss_type must be"):
        KTOLossConfig(loss_type="sigmoid")
    with pytest.raises(ValueError, match="beta must be"):
        KTOLossConfig(beta=0)
    with pytest.raises(ValueError, match="desirable must be"):
        kto_loss(logps, logps, desirable.long(), config, mask=mask)
    with pytest.raises(ValueError, match="kl_logps and ref_kl_logps"):
        kto_loss(logps, logps, desirable, config, mask=mask)
    kl = dict(kl_logps=torch.zeros(3), ref_kl_logps=torch.zeros(3))
    with pytest.raises(ValueError, match="ref_logps must be"):
        kto_loss(logps, logps[:, :2], desirable, config, mask=mask, **kl)
    empty = mask.clone()
    empty[2] = 0
    with pytest.raises(ValueError, match=r"rows \[2\]"):
        kto_loss(logps, logps, desirable, config, mask=empty, **kl)


def test_from_hidden_matches_logits_path_fp64():
    """dpo_loss_from_hidden, kto_loss_from_hidden and head_logps (temperature, entropies) vs log_softmax of the
    logits: values and gradients in fp64."""
    g = torch.Generator().manual_seed(0)
    b, t, h, v = 4, 6, 8, 37
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[1, 4:] = 0
    mask[2, :2] = 0
    ref = torch.randn(b, generator=g, dtype=torch.float64) - 10
    desirable = torch.tensor([True, False, False, True])
    kl = dict(kl_logps=torch.randn(b, generator=g, dtype=torch.float64),
              ref_kl_logps=torch.zeros(b, dtype=torch.float64))

    def logits_path(temperature=1.0):
        logp = torch.log_softmax((hidden @ weight.t() + bias) / temperature, -1)
        return logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask, -(logp.exp() * logp).sum(-1) * mask

    cases = [(lambda: dpo_loss_from_hidden(hidden, weight, ids, mask, ref, DPOLossConfig(), bias=bias)[0],
              lambda: dpo_loss(logits_path()[0], ref, mask, DPOLossConfig())[0]),
             (lambda: kto_loss_from_hidden(hidden, weight, ids, mask, ref, desirable, KTOLossConfig(), bias=bias,
                                           **kl)[0],
              lambda: kto_loss(logits_path()[0], ref, desirable, KTOLossConfig(), mask=mask, **kl)[0]),
             (lambda: sum(x.sum() for x in head_logps(hidden, weight, ids, mask, bias=bias, temperature=0.6,
                                                        entropy=True)),
              lambda: sum(x.sum() for x in logits_path(0.6)))]
    for ours, theirs in cases:
        value, expected = ours(), theirs()
        assert rel_error(value, expected) < 1e-12
        for a, e in zip(torch.autograd.grad(value, (hidden, weight)), torch.autograd.grad(expected, (hidden, weight))):
            assert rel_error(a, e) < 1e-10
