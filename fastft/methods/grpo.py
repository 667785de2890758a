"""GRPO's policy loss as plain torch on per-token log-probabilities (completions, tokens), e.g. from
`fastft.losses.fused_linear_logprobs`, with every `loss_type` of TRL 1.16's GRPOConfig (grpo, dr_grpo, dapo, bnpo,
cispo, sapo, luspo, vespo), token- or sequence-level importance sampling, clipping (epsilon low / high, delta), the
KL term to the reference (beta), the entropy bonus and entropy masking (top_entropy_quantile), the off-policy
sequence mask and a sampler's importance-sampling ratios; TRL's formulas (checked against GRPOTrainer's loss in
tests/methods/test_grpo.py). `grpo_loss_from_hidden` runs the fused op first: no (tokens, vocab) logits.

The statistics TRL reduces over processes (the entropy quantile, the token count of dapo / cispo / vespo) are taken
over this batch; pass `num_items_in_batch` to divide by another count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from fastft.methods.common import check_number
from fastft.losses import PolicyGradientTerms, fused_linear_policy_logprobs
from fastft.methods.preference import head_logps, scaled_head_inputs

GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo", "cispo", "sapo", "luspo", "vespo")
CLIPPED_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")


@dataclass
class GRPOLossConfig:
    """TRL's GRPOConfig fields the loss reads (same names and defaults). max_completion_length is dr_grpo's
    constant divisor (None: the tokens dimension of the batch)."""

    loss_type: str = "dapo"
    beta: float = 0.0
    epsilon: float = 0.2
    epsilon_high: float | None = None
    delta: float | None = None
    importance_sampling_level: str = "token"
    use_bias_correction_kl: bool = True
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0
    top_entropy_quantile: float = 1.0
    entropy_coef: float = 0.0
    off_policy_mask_threshold: float | None = None
    max_completion_length: int | None = None

    def __post_init__(self):
        if self.loss_type not in GRPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {GRPO_LOSS_TYPES}, got {self.loss_type!r}")
        if self.importance_sampling_level not in ("token", "sequence"):
            raise ValueError(f"importance_sampling_level must be 'token' or 'sequence', got "
                             f"{self.importance_sampling_level!r}")
        check_number("beta", self.beta, allow_zero=True)
        check_number("epsilon", self.epsilon, allow_zero=True)
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        check_number("epsilon_high", self.epsilon_high, allow_zero=True)
        if self.delta is not None:
            check_number("delta", self.delta)
        for name in ("sapo_temperature_neg", "sapo_temperature_pos"):
            check_number(name, getattr(self, name))
        if not (isinstance(self.entropy_coef, (int, float)) and math.isfinite(self.entropy_coef)):
            raise ValueError(f"entropy_coef must be a finite number, got {self.entropy_coef!r}")
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ValueError(f"top_entropy_quantile must be in (0, 1], got {self.top_entropy_quantile!r}")
        if self.max_completion_length is not None:
            check_number("max_completion_length", self.max_completion_length)

    @property
    def needs_entropy(self) -> bool:
        return self.entropy_coef != 0.0 or self.top_entropy_quantile < 1.0


def high_entropy_mask(entropies: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """Tokens of `mask` whose entropy is at least the `quantile` quantile of the masked entropies (bool)."""
    threshold = torch.quantile(entropies[mask.bool()].float(), quantile)
    return ((entropies * mask) >= threshold) & mask.bool()


@torch.no_grad()
def gamma_weights(advantages: Tensor, log_ratio: Tensor, mask: Tensor, config: GRPOLossConfig,
                  importance_sampling_ratio: Tensor | None = None) -> Tensor:
    """VESPO's per-sequence weight phi(w) = exp(lambda + k log w - lambda w) of the sequence ratio w (clamped to
    [1e-8, e^20]), with (k, lambda) by the sign of the advantage; (completions, 1), no gradient."""
    low = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
    if importance_sampling_ratio is not None:
        log_w = log_w + torch.log(importance_sampling_ratio).clamp(low, 20.0).sum(-1, keepdim=True)
    log_w = log_w.clamp(low, 20.0)
    positive = advantages >= 0
    k = torch.where(positive, config.vespo_k_pos, config.vespo_k_neg)
    lam = torch.where(positive, config.vespo_lambda_pos, config.vespo_lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _check(per_token_logps, mask, advantages, old, ref, entropies, config, ratios, num_items, accumulation_steps):
    if per_token_logps.dim() != 2:
        raise ValueError(f"per_token_logps must be (completions, tokens), got {tuple(per_token_logps.shape)}")
    shape = per_token_logps.shape
    for name, value in (("mask", mask), ("old_per_token_logps", old), ("ref_per_token_logps", ref),
                        ("entropies", entropies)):
        if value is not None and value.shape != shape:
            raise ValueError(f"{name} must have the shape of per_token_logps {tuple(shape)}, got "
                             f"{tuple(value.shape)}")
    if advantages.shape not in (shape[:1], shape):
        raise ValueError(f"advantages must be per completion ({shape[0]},) or per token {tuple(shape)}, got "
                         f"{tuple(advantages.shape)}")
    if ratios is not None and ratios.shape not in (shape, (shape[0], 1)):
        raise ValueError(f"importance_sampling_ratio must be per token {tuple(shape)} or per completion "
                         f"({shape[0]}, 1), got {tuple(ratios.shape)}")
    if not isinstance(accumulation_steps, int) or isinstance(accumulation_steps, bool) or accumulation_steps < 1:
        raise ValueError(f"accumulation_steps must be an int >= 1, got {accumulation_steps!r}")
    if num_items is not None:
        check_number("num_items_in_batch", float(num_items))
    if not bool(mask.bool().any()):
        raise ValueError("mask selects no token: every completion is empty")
    if config.beta != 0.0 and ref is None:
        raise ValueError(f"ref_per_token_logps is required when beta != 0 (beta={config.beta})")
    if config.needs_entropy and entropies is None:
        raise ValueError("entropies are required for the entropy bonus (entropy_coef != 0) and entropy masking "
                         "(top_entropy_quantile < 1)")


def _reduce(masked: Tensor, mask: Tensor, config: GRPOLossConfig, num_items_in_batch) -> Tensor:
    """The loss type's reduction of the masked per-token losses (completions, tokens) to the policy loss."""
    kind = config.loss_type
    if kind in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    if kind == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if kind == "dr_grpo":
        return masked.sum() / (masked.size(0) * (config.max_completion_length or masked.size(1)))
    if kind == "luspo":
        return masked.sum(-1).mean()
    if num_items_in_batch is None:  # cispo, dapo, vespo: this batch's tokens
        return masked.sum() / mask.sum()
    # the tokens of the whole accumulation window: already the divisor of one micro-batch's sum
    return masked.sum() / torch.as_tensor(num_items_in_batch, dtype=masked.dtype).clamp(min=1.0)


def _accumulation_divisor(config: GRPOLossConfig, num_items_in_batch, accumulation_steps: int) -> int:
    token_counted = config.loss_type in ("cispo", "dapo", "vespo") and num_items_in_batch is not None
    return 1 if token_counted else accumulation_steps


def grpo_loss(per_token_logps: Tensor, mask: Tensor, advantages: Tensor, config: GRPOLossConfig, *,
              old_per_token_logps: Tensor | None = None, ref_per_token_logps: Tensor | None = None,
              entropies: Tensor | None = None, num_items_in_batch: float | Tensor | None = None,
              accumulation_steps: int = 1, importance_sampling_ratio: Tensor | None = None,
              sampling_per_token_logps: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) for the policy's log-probabilities (completions, tokens) of the sampled tokens, the
    completion mask (same shape), advantages per completion (completions,) or per token; old_per_token_logps
    (None: on-policy, the policy's own, detached), ref_per_token_logps (needed when beta != 0) and entropies (needed
    for entropy_coef / top_entropy_quantile) shaped like per_token_logps. num_items_in_batch: the token count dapo,
    cispo and vespo divide by, counting the whole accumulation window (TRL: the generation batch's count /
    processes * accumulation steps / steps per generation; None: mask's count, then divided by accumulation_steps
    like the other types). accumulation_steps (TRL's current_gradient_accumulation_steps) divides the other loss
    types and the entropy bonus. importance_sampling_ratio (per token or per completion, a sampler's
    pi_old / pi_sampler, e.g. vLLM's) multiplies the per-token loss; sampling_per_token_logps is what the
    off-policy mask compares with (None: old_per_token_logps).
    Metrics (detached, TRL's names): kl, entropy, clip_ratio/{low,high,region}_mean, clip_ratio/low_min,
    clip_ratio/high_max, cispo_clip_ratio, vespo/phi_seq_mean, policy_loss, as the loss type has them."""
    _check(per_token_logps, mask, advantages, old_per_token_logps, ref_per_token_logps, entropies, config,
           importance_sampling_ratio, num_items_in_batch, accumulation_steps)
    mask = mask.to(per_token_logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    old = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps
    kind, lo, hi = config.loss_type, config.epsilon, config.epsilon_high
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(entropies, mask, 1 - config.top_entropy_quantile)

    log_ratio = per_token_logps - old
    if config.importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)

    if config.beta != 0.0:
        diff = ref_per_token_logps - per_token_logps
        per_token_kl = torch.exp(diff) - diff - 1
        if config.use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1

    metrics = {}
    if kind == "cispo":
        per_token = -torch.clamp(coef_1, max=hi).detach() * advantages * per_token_logps
    elif kind in CLIPPED_TYPES:
        coef_2 = torch.clamp(coef_1, 1 - lo, 1 + hi)
        if config.delta is not None:
            coef_1 = torch.clamp(coef_1, max=config.delta)
        per_token = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif kind == "sapo":
        temperature = torch.where(advantages > 0, config.sapo_temperature_pos, config.sapo_temperature_neg)
        per_token = -torch.sigmoid(temperature * (coef_1 - 1)) * 4 / temperature * advantages
    else:  # vespo
        phi = gamma_weights(advantages, log_ratio, mask, config, importance_sampling_ratio)
        per_token = -phi * advantages * per_token_logps
        metrics["vespo/phi_seq_mean"] = phi.mean()

    if config.off_policy_mask_threshold is not None:
        sampled = old if sampling_per_token_logps is None else sampling_per_token_logps
        kl = torch.nan_to_num(sampled - per_token_logps.detach(), nan=0.0)
        seq_kl = (kl * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
        per_token = per_token * ((advantages >= 0) | (seq_kl <= config.off_policy_mask_threshold)).to(mask.dtype)
    if entropy_mask is not None:
        per_token = per_token * entropy_mask
    if importance_sampling_ratio is not None and kind != "vespo":
        per_token = per_token * importance_sampling_ratio
    if config.beta != 0.0:
        per_token = per_token + config.beta * per_token_kl

    loss = _reduce(per_token * mask, mask, config, num_items_in_batch)
    metrics["policy_loss"] = loss.detach()
    loss = loss / _accumulation_divisor(config, num_items_in_batch, accumulation_steps)
    if config.entropy_coef != 0.0:
        effective = mask if entropy_mask is None else mask * entropy_mask
        bonus = (entropies * effective).sum() / effective.sum().clamp(min=1.0) / accumulation_steps
        loss = loss - config.entropy_coef * bonus

    def token_mean(x):
        x = x.detach()
        return x.mean() if x.shape[1] == 1 else (x * mask).sum() / mask.sum()

    def sequence_means(x):  # over the non-empty completions
        if x.shape[1] == 1:
            return x.squeeze(1)
        count = mask.sum(-1)
        return ((x * mask).sum(-1) / count.clamp(min=1.0))[count > 0]

    if config.beta != 0.0:
        metrics["kl"] = token_mean(per_token_kl)
    if entropies is not None:
        metrics["entropy"] = token_mean(entropies)
    if kind in CLIPPED_TYPES:
        low = ((coef_1 < 1 - lo) & (advantages < 0)).float()
        high = ((coef_1 > 1 + hi) & (advantages > 0)).float()
        metrics.update({"clip_ratio/low_mean": token_mean(low), "clip_ratio/high_mean": token_mean(high),
                        "clip_ratio/region_mean": token_mean(torch.maximum(low, high)),
                        "clip_ratio/low_min": sequence_means(low).min(),
                        "clip_ratio/high_max": sequence_means(high).max()})
    elif kind == "cispo":
        metrics["cispo_clip_ratio"] = token_mean(((coef_1 > hi) & (advantages > 0)).float())
    return loss, metrics


def _token_local(config: GRPOLossConfig) -> bool:
    """Whether each token's d(loss)/d(logprob) depends on that token's log-probability only (given the masks)."""
    return (config.loss_type != "vespo" and config.importance_sampling_level == "token"
            and config.top_entropy_quantile == 1.0 and config.off_policy_mask_threshold is None)


def policy_terms(mask: Tensor, advantages: Tensor, config: GRPOLossConfig, *, old_per_token_logps=None,
                 ref_per_token_logps=None, num_items_in_batch=None, accumulation_steps: int = 1,
                 importance_sampling_ratio=None, dtype: torch.dtype = torch.float32) -> PolicyGradientTerms:
    """grpo_loss's loss for a token-local config (token-level ratios, no entropy masking, no off-policy mask, not
    vespo) as per-token terms for fastft.losses.fused_linear_policy_logprobs: each token's weight is the loss type's
    reduction's derivative (autograd of the reduction itself, so the two cannot drift apart), in dtype."""
    mask = mask.to(dtype)
    with torch.enable_grad():
        unit = torch.zeros_like(mask, requires_grad=True)
        weight, = torch.autograd.grad(_reduce(unit * mask, mask, config, num_items_in_batch), unit)
    weight = weight / _accumulation_divisor(config, num_items_in_batch, accumulation_steps)
    policy_weight = weight if importance_sampling_ratio is None else weight * importance_sampling_ratio
    advantages = advantages.unsqueeze(1) if advantages.dim() == 1 else advantages
    entropy_weight = None
    if config.entropy_coef != 0.0:
        entropy_weight = -config.entropy_coef * mask / mask.sum().clamp(min=1.0) / accumulation_steps
    kind = config.loss_type
    return PolicyGradientTerms(
        advantage=advantages.to(dtype).expand(mask.shape), token_weight=policy_weight.expand(mask.shape),
        old_logprob=old_per_token_logps, kl_weight=None if config.beta == 0.0 else config.beta * weight,
        ref_logprob=None if config.beta == 0.0 else ref_per_token_logps, entropy_weight=entropy_weight,
        loss_type=kind if kind in ("cispo", "sapo") else "clip", epsilon_low=config.epsilon,
        epsilon_high=config.epsilon_high, delta=config.delta if kind in CLIPPED_TYPES else None,
        kl_bias_correction=config.use_bias_correction_kl, sapo_temperature_pos=config.sapo_temperature_pos,
        sapo_temperature_neg=config.sapo_temperature_neg)


def grpo_loss_from_hidden(hidden: Tensor, weight: Tensor, completion_ids: Tensor, mask: Tensor, advantages: Tensor,
                          config: GRPOLossConfig, *, bias: Tensor | None = None, temperature: float = 1.0,
                          **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """grpo_loss on the log-probabilities of completion_ids (completions, tokens) under softmax(hidden @ weight^T
    + bias) / temperature, with no (tokens, vocab) logits. hidden (completions, tokens, H) holds the states that
    predict each completion token (a causal LM's positions shifted by one, as TRL's logits_to_keep). Other keywords
    go to grpo_loss. For a token-local config (policy_terms) the head's gradients are taken in the forward pass
    (fastft.losses.fused_linear_policy_logprobs: one head GEMM per chunk less); otherwise through
    fastft::fused_linear_logprobs (with the entropies when the config needs them), recomputed in backward."""
    if not _token_local(config):
        logps, entropies = head_logps(hidden, weight, completion_ids, mask, bias=bias, temperature=temperature,
                                      entropy=config.needs_entropy)
        return grpo_loss(logps, mask, advantages, config, entropies=entropies, **kwargs)
    dtype = torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32
    shaped = hidden.new_empty(completion_ids.shape, dtype=dtype)  # stands for the log-probabilities in the checks
    _check(shaped, mask, advantages, kwargs.get("old_per_token_logps"), kwargs.get("ref_per_token_logps"),
           shaped if config.needs_entropy else None, config, kwargs.get("importance_sampling_ratio"),
           kwargs.get("num_items_in_batch"), kwargs.get("accumulation_steps", 1))
    terms = policy_terms(mask, advantages, config, dtype=dtype, **{k: kwargs[k] for k in _TERM_KEYS if k in kwargs})
    hidden, bias, labels = scaled_head_inputs(hidden, bias, completion_ids, mask, temperature)
    out = fused_linear_policy_logprobs(hidden, weight, labels, terms, bias=bias, entropy=config.needs_entropy)
    return grpo_loss(out.logprob, mask, advantages, config, entropies=out.entropy, **kwargs)


_TERM_KEYS = ("old_per_token_logps", "ref_per_token_logps", "num_items_in_batch", "accumulation_steps",
              "importance_sampling_ratio")
