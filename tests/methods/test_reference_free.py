"""fastft.methods.reference_free (ORPO, CPO / SimPO / AlphaPO) from a tiny Llama's hidden states through
fastft::fused_linear_logprobs vs TRL 1.16's ORPOTrainer / CPOTrainer (trl.experimental) compute_loss on the same
model and batch, which builds the full logits: loss, gradients of every parameter and the logged metrics (fp32,
1e-5 relative), every CPO loss type; bad input."""

import pytest
import torch
from trl.experimental.cpo import CPOConfig, CPOTrainer
from trl.experimental.orpo import ORPOConfig, ORPOTrainer

from conftest import rel_error
from fastft.methods.reference_free import (CPO_LOSS_TYPES, CPOLossConfig, ORPOLossConfig, cpo_loss,
                                           cpo_loss_from_hidden, orpo_loss, orpo_loss_from_hidden)
from integrations.trl_fixtures import preference_dataset, tiny_llama, tokenizer

COMMON = dict(output_dir="/tmp/fastft-reference-free-test", report_to=[], use_cpu=True, per_device_train_batch_size=4,
              max_length=32, bf16=False)


def build(trainer_class, args):
    trainer = trainer_class(model=tiny_llama(0), args=args, train_dataset=preference_dataset(),
                            processing_class=tokenizer())
    trainer.model.train()
    return trainer, next(iter(trainer.get_train_dataloader()))


def trl_run(trainer, batch):
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    metrics = {k: v[-1] for k, v in trainer._stored_metrics["train"].items()}
    trainer._stored_metrics["train"].clear()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}, metrics


def hidden_and_masks(trainer, batch):
    """The model's last hidden states before each next token, the next tokens, the completion mask and the mask of
    every real token (prompt included), as TRL concatenates chosen and rejected."""
    c = trainer.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=trainer.padding_value
                                    if hasattr(trainer, "padding_value") else trainer.pad_token_id, device="cpu")
    ids, attention = c["concatenated_input_ids"], c["concatenated_attention_mask"]
    hidden = trainer.model.model(input_ids=ids, attention_mask=attention).last_hidden_state
    return hidden[:, :-1], ids[:, 1:], c["concatenated_labels"][:, 1:] != -100, attention[:, 1:]


def assert_same(trainer, batch, ours):
    loss, grads, their_metrics = trl_run(trainer, batch)
    trainer.model.zero_grad()
    our_loss, metrics = ours()
    our_loss.backward()
    assert torch.isfinite(our_loss) and rel_error(our_loss, loss) < 1e-5
    for name, grad in grads.items():
        assert rel_error(trainer.model.get_parameter(name).grad, grad) < 1e-5, name
    assert set(metrics) == set(their_metrics) - {"logits/chosen", "logits/rejected"}
    for key, value in metrics.items():
        assert abs(float(value) - their_metrics[key]) <= 1e-5 * max(1.0, abs(their_metrics[key])), key


def test_orpo_matches_trl():
    trainer, batch = build(ORPOTrainer, ORPOConfig(**COMMON, beta=0.3))
    weight = trainer.model.lm_head.weight

    def ours():
        hidden, ids, completion, real = hidden_and_masks(trainer, batch)
        pairs = ids.shape[0] // 2
        return orpo_loss_from_hidden(hidden, weight, ids, completion, ORPOLossConfig(beta=0.3),
                                     nll_mask=real[:pairs])
    assert_same(trainer, batch, ours)


@pytest.fixture(scope="module")
def cpo_setup():
    return build(CPOTrainer, CPOConfig(**COMMON, loss_type="simpo"))


@pytest.mark.parametrize("loss_type", CPO_LOSS_TYPES + ("alphapo",))
def test_cpo_loss_types_match_trl(cpo_setup, loss_type):
    """Label smoothing on sigmoid and simpo, the AlphaPO reward on sigmoid and alphapo (simpo without the NLL)."""
    trainer, batch = cpo_setup
    settings = dict(beta=0.3, loss_type=loss_type, label_smoothing=0.1 if loss_type in ("sigmoid", "simpo") else 0.0,
                    cpo_alpha=0.5, simpo_gamma=0.4, alpha=0.2 if loss_type in ("alphapo", "sigmoid") else 0.0)
    config = CPOLossConfig(**settings)
    for name in ("beta", "loss_type", "label_smoothing", "cpo_alpha", "simpo_gamma", "alpha"):
        setattr(trainer, name, getattr(config, name))  # what CPOTrainer.__init__ takes from CPOConfig

    def ours():
        hidden, ids, completion, _ = hidden_and_masks(trainer, batch)
        return cpo_loss_from_hidden(hidden, trainer.model.lm_head.weight, ids, completion, config)
    assert_same(trainer, batch, ours)


def test_bad_input():
    logps, mask = torch.randn(4, 5), torch.ones(4, 5)
    with pytest.raises(ValueError, match="policy_token_logps must be"):
        orpo_loss(logps[:3], mask[:3], ORPOLossConfig())
    with pytest.raises(ValueError, match="mask must have the shape"):
        cpo_loss(logps, mask[:, :4], CPOLossConfig())
    empty = mask.clone()
    empty[3] = 0
    with pytest.raises(ValueError, match=r"rows \[3\]"):
        cpo_loss(logps, empty, CPOLossConfig())
    with pytest.raises(ValueError, match="nll_mask selects no token"):
        orpo_loss(logps, mask, ORPOLossConfig(), nll_mask=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="nll_mask must be"):
        orpo_loss(logps, mask, ORPOLossConfig(), nll_mask=torch.ones(3, 5))
    with pytest.raises(ValueError, match="beta must be"):
        ORPOLossConfig(beta=-1.0)
    with pytest.raises(ValueError, match="beta must be"):
        CPOLossConfig(beta=0.0)
    with pytest.raises(ValueError, match="loss_type must be"):
        CPOLossConfig(loss_type="kto_pair")
    with pytest.raises(ValueError, match="label_smoothing"):
        CPOLossConfig(label_smoothing=0.5)
