"""fastft.methods.grpo.grpo_loss on per-token log-probabilities vs TRL 1.16's GRPOTrainer loss on the same model and
batch (tiny Llama + LoRA): every loss_type, token- and sequence-level importance sampling, asymmetric clipping,
delta, the KL term, the entropy bonus and masking, the off-policy mask and a sampler's importance-sampling ratios,
under gradient accumulation; loss, gradients and logged metrics (fp32, 1e-5 relative). grpo_loss_from_hidden vs the
logits path in fp64; bad input."""

import copy
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from trl import GRPOConfig, GRPOTrainer

from conftest import rel_error
from fastft.methods.grpo import GRPO_LOSS_TYPES, GRPOLossConfig, grpo_loss, grpo_loss_from_hidden
from integrations.trl_fixtures import grpo_inputs, text_dataset, tiny_llama, tokenizer


@pytest.fixture(scope="module")
def setup():
    model = get_peft_model(tiny_llama(0), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False))
    args = GRPOConfig(output_dir="/tmp/fastft-grpo-test", report_to=[], use_cpu=True, per_device_train_batch_size=2,
                      num_generations=2, max_completion_length=8, beta=0.04, temperature=0.7, epsilon_high=0.28,
                      entropy_coef=0.01, top_entropy_quantile=0.5, bf16=False)
    trainer = GRPOTrainer(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=text_dataset(), processing_class=tokenizer())
    trainer.current_gradient_accumulation_steps = 2
    trainer.model.train()
    g = torch.Generator().manual_seed(1)
    inputs = grpo_inputs(trainer, g)
    old = inputs["old_per_token_logps"]
    inputs["old_per_token_logps"] = old + 0.3 * torch.randn(old.shape, generator=g)  # some ratios clip
    inputs["importance_sampling_ratio"] = torch.exp(0.1 * torch.randn(old.shape, generator=g))
    return trainer, inputs


def config_of(trainer) -> GRPOLossConfig:
    a = trainer.args
    return GRPOLossConfig(loss_type=trainer.loss_type, beta=trainer.beta, epsilon=trainer.epsilon_low,
                          epsilon_high=trainer.epsilon_high, delta=a.delta,
                          importance_sampling_level=trainer.importance_sampling_level,
                          use_bias_correction_kl=a.use_bias_correction_kl,
                          top_entropy_quantile=trainer.top_entropy_quantile, entropy_coef=trainer.entropy_coef,
                          off_policy_mask_threshold=trainer.off_policy_mask_threshold,
                          max_completion_length=trainer.max_completion_length)


def trl_run(trainer, inputs):
    trainer.model.zero_grad()
    loss = trainer._compute_loss(trainer.model, copy.copy(inputs))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    trainer._metrics["train"].clear()
    return loss.detach(), grads, metrics


def fastft_run(trainer, inputs):
    trainer.model.zero_grad()
    prompt, completion = inputs["prompt_ids"], inputs["completion_ids"]
    logps, entropies, _ = trainer._get_per_token_logps_and_entropies(
        trainer.model, torch.cat([prompt, completion], 1), torch.cat([inputs["prompt_mask"],
                                                                     inputs["completion_mask"]], 1),
        completion.shape[1], compute_entropy=True)
    # TRL multiplies by a sampler's ratios under vLLM's correction; VESPO's gamma weights take them whenever given
    use_ratios = trainer.use_vllm or trainer.loss_type == "vespo"
    sampler = inputs["importance_sampling_ratio"] if use_ratios else None
    num_items = inputs["num_items_in_batch"] * trainer.current_gradient_accumulation_steps / \
        trainer.args.steps_per_generation
    loss, metrics = grpo_loss(logps, inputs["completion_mask"], inputs["advantages"], config_of(trainer),
                              old_per_token_logps=inputs["old_per_token_logps"],
                              ref_per_token_logps=inputs["ref_per_token_logps"], entropies=entropies,
                              num_items_in_batch=num_items,
                              accumulation_steps=trainer.current_gradient_accumulation_steps,
                              importance_sampling_ratio=sampler)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, metrics


def assert_same(trainer, inputs):
    loss, grads, their_metrics = trl_run(trainer, inputs)
    ours, our_grads, metrics = fastft_run(trainer, inputs)
    assert torch.isfinite(ours) and rel_error(ours, loss) < 1e-5
    for name in grads:
        assert rel_error(our_grads[name], grads[name]) < 1e-5, name
    shared = their_metrics.keys() & metrics.keys()
    assert shared >= {"entropy", "kl", "policy_loss"}
    for key in shared:
        assert abs(float(metrics[key]) - their_metrics[key]) <= 1e-5 * max(1.0, abs(their_metrics[key])), key


CASES = [(t, "sequence" if t == "luspo" else "token") for t in GRPO_LOSS_TYPES] + [("grpo", "sequence")]


@pytest.mark.parametrize("loss_type, level", CASES)
def test_loss_types_match_trl(setup, loss_type, level):
    trainer, inputs = setup
    trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    assert_same(trainer, inputs)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "vespo"])
def test_delta_off_policy_mask_and_sampler_ratios_match_trl(setup, loss_type):
    """Two-sided clipping (delta), the off-policy sequence mask and vLLM-style importance-sampling ratios (which
    VESPO folds into its gamma weights), without the KL bias correction."""
    trainer, inputs = setup
    trainer.loss_type, trainer.importance_sampling_level = loss_type, "token"
    trainer.args.delta, trainer.off_policy_mask_threshold = 1.1, 0.02
    trainer.args.use_bias_correction_kl = False
    trainer.use_vllm = trainer.vllm_importance_sampling_correction = True
    try:
        assert_same(trainer, inputs)
    finally:
        trainer.args.delta, trainer.off_policy_mask_threshold = None, None
        trainer.args.use_bias_correction_kl = True
        trainer.use_vllm = False


def fp64_head_inputs(b, t, h=8, v=33):
    """(generator for further draws, hidden (b, t, h), head (v, h), ids (b, t), mask with row 2 cut at 3), fp64."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(b, t, h, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, v, (b, t), generator=g)
    mask = torch.ones(b, t)
    mask[2, 3:] = 0
    return g, hidden, weight, ids, mask


def test_from_hidden_matches_logits_path_fp64():
    """grpo_loss_from_hidden (fused op, temperature, entropies) vs log_softmax of the logits, values and
    gradients in fp64."""
    b, t = 3, 5
    g, hidden, weight, ids, mask = fp64_head_inputs(b, t)
    advantages = torch.randn(b, generator=g, dtype=torch.float64)
    ref = torch.randn(b, t, generator=g, dtype=torch.float64) - 3
    config = GRPOLossConfig(loss_type="dapo", beta=0.1, entropy_coef=0.05, top_entropy_quantile=0.6)
    loss, _ = grpo_loss_from_hidden(hidden, weight, ids, mask, advantages, config, temperature=0.7,
                                    ref_per_token_logps=ref)
    ours = torch.autograd.grad(loss, (hidden, weight))
    logp = torch.log_softmax(hidden @ weight.t() / 0.7, -1)
    entropies = -(logp.exp() * logp).sum(-1)
    expected, _ = grpo_loss(logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask, mask, advantages, config,
                            ref_per_token_logps=ref, entropies=entropies)
    theirs = torch.autograd.grad(expected, (hidden, weight))
    assert rel_error(loss, expected) < 1e-12
    for a, e in zip(ours, theirs):
        assert rel_error(a, e) < 1e-10


@pytest.mark.parametrize("loss_type", [t for t in GRPO_LOSS_TYPES if t != "vespo"])
def test_token_local_losses_take_gradients_in_forward(loss_type):
    """grpo_loss_from_hidden on a token-local config (fastft.losses.fused_linear_policy_logprobs: no recompute, no
    warning) vs grpo_loss on the logits path: loss and gradients in fp64, off-policy ratios, delta, KL, entropy
    bonus, per-token sampler ratios, accumulation."""
    b, t = 3, 6
    g, hidden, weight, ids, mask = fp64_head_inputs(b, t)
    logp = torch.log_softmax(hidden @ weight.t() / 0.7, -1)
    token_logps = logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1) * mask
    noise = lambda: torch.randn(b, t, generator=g, dtype=torch.float64)  # noqa: E731
    kwargs = dict(old_per_token_logps=token_logps.detach() + 0.3 * noise(),
                  ref_per_token_logps=token_logps.detach() + 0.2 * noise(), accumulation_steps=2,
                  importance_sampling_ratio=torch.exp(0.1 * noise()))
    advantages = torch.randn(b, generator=g, dtype=torch.float64)
    config = GRPOLossConfig(loss_type=loss_type, beta=0.1, entropy_coef=0.05, epsilon_high=0.28,
                            delta=1.4 if loss_type == "grpo" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, metrics = grpo_loss_from_hidden(hidden, weight, ids, mask, advantages, config, temperature=0.7,
                                              **kwargs)
        ours = torch.autograd.grad(loss, (hidden, weight))
    entropies = -(logp.exp() * logp).sum(-1)
    expected, expected_metrics = grpo_loss(token_logps, mask, advantages, config, entropies=entropies, **kwargs)
    theirs = torch.autograd.grad(expected, (hidden, weight))
    assert rel_error(loss, expected) < 1e-12
    for a, e in zip(ours, theirs):
        assert rel_error(a, e) < 1e-10
    assert metrics.keys() == expected_metrics.keys()


def test_bad_input():
    logps, mask, adv = torch.randn(2, 3), torch.ones(2, 3), torch.randn(2)
    with pytest.raises(ValueError, match="loss_type must be"):
        GRPOLossConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        GRPOLossConfig(importance_sampling_level="batch")
    with pytest.raises(ValueError, match="beta must be"):
        GRPOLossConfig(beta=-0.1)
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        GRPOLossConfig(top_entropy_quantile=0.0)
    with pytest.raises(ValueError, match="mask must have the shape"):
        grpo_loss(logps, mask[:, :2], adv, GRPOLossConfig())
    with pytest.raises(ValueError, match="advantages must be"):
        grpo_loss(logps, mask, adv[:1], GRPOLossConfig())
    with pytest.raises(ValueError, match="mask selects no token"):
        grpo_loss(logps, torch.zeros(2, 3), adv, GRPOLossConfig())
    with pytest.raises(ValueError, match="ref_per_token_logps is required"):
        grpo_loss(logps, mask, adv, GRPOLossConfig(beta=0.1))
    with pytest.raises(ValueError, match="entropies are required"):
        grpo_loss(logps, mask, adv, GRPOLossConfig(entropy_coef=0.01))
    with pytest.raises(ValueError, match="importance_sampling_ratio must be"):
        grpo_loss(logps, mask, adv, GRPOLossConfig(), importance_sampling_ratio=torch.ones(2))
    with pytest.raises(ValueError, match="accumulation_steps must be"):
        grpo_loss(logps, mask, adv, GRPOLossConfig(), accumulation_steps=0)
    with pytest.raises(ValueError, match="num_items_in_batch must be"):
        grpo_loss(logps, mask, adv, GRPOLossConfig(), num_items_in_batch=torch.tensor(0.0))
    one_empty = mask.clone()
    one_empty[1] = 0  # an empty completion contributes nothing, as in TRL: finite loss, no NaN metric
    for loss_type in GRPO_LOSS_TYPES:
        loss, metrics = grpo_loss(logps, one_empty, adv, GRPOLossConfig(loss_type=loss_type))
        assert torch.isfinite(loss) and all(torch.isfinite(m) for m in metrics.values()), loss_type
