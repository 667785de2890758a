"""Preference losses as plain torch on per-token log-probabilities (batch, tokens), e.g. from
`fastft.losses.fused_linear_logprobs` (0 on ignored tokens; `head_logps` runs it from hidden states): DPO with every
`loss_type` of TRL 1.16's DPOConfig, several at once with `loss_weights`, `ld_alpha` and the f-divergence options,
and KTO (both loss types of KTOConfig, its KL estimate, desirable / undesirable weights), with TRL's formulas
(checked against DPOTrainer's / KTOTrainer's compute_loss in tests/methods/test_preference.py). ORPO and CPO / SimPO
(no reference model): fastft/methods/reference_free.py; GRPO: fastft/methods/grpo.py.

Batch layout as TRL's: the first half of the rows are the chosen completions, the second half the rejected ones of
the same prompts. Reference log-probabilities come in three ways, all as tensors here: a separate reference model's
(under torch.no_grad), the same peft model's with its adapters disabled (`with model.disable_adapter():`), or
precomputed ones (per sequence, (batch,)).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft.methods.common import check_number

KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")


@dataclass
class DPOLossConfig:
    """TRL's DPOConfig fields the loss reads (same names and defaults)."""

    beta: float = 0.1
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    label_smoothing: float = 0.0
    ld_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0
    discopop_tau: float = 0.05

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        bad = [t for t in self.loss_type if t not in DPO_LOSS_TYPES]
        if bad or not self.loss_type:
            raise ValueError(f"loss_type must be a non-empty list of {DPO_LOSS_TYPES}, got {self.loss_type}")
        if self.loss_weights is None:
            self.loss_weights = [1.0] * len(self.loss_type)
        if len(self.loss_weights) != len(self.loss_type):
            raise ValueError(f"loss_weights must have one weight per loss_type ({len(self.loss_type)}), got "
                             f"{len(self.loss_weights)}")
        check_number("beta", self.beta)
        if self.f_divergence_type not in F_DIVERGENCES:
            raise ValueError(f"f_divergence_type must be one of {F_DIVERGENCES}, got {self.f_divergence_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if "exo_pair" in self.loss_type and self.label_smoothing == 0.0:
            raise ValueError("loss_type 'exo_pair' needs label_smoothing > 0 (log(label_smoothing) enters the loss)")


def head_logps(hidden: Tensor, weight: Tensor, ids: Tensor, mask: Tensor, *, bias: Tensor | None = None,
               temperature: float = 1.0, entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(log-probabilities, entropies or None), both (batch, tokens) fp32, of `ids` (batch, tokens) under
    softmax((hidden @ weight^T + bias) / temperature) for hidden (batch, tokens, H) already aligned with ids (a causal
    LM's hidden[:, :-1] for ids[:, 1:]), from fastft::fused_linear_logprobs: tokens outside `mask` get 0 and cost
    no matmul, and no (tokens, vocab) logits exist."""
    from fastft.losses import fused_linear_logprobs

    hidden, bias, labels = scaled_head_inputs(hidden, bias, ids, mask, temperature)
    out = fused_linear_logprobs(hidden, weight, labels, bias=bias, entropy=entropy)
    return out if entropy else (out, None)


def scaled_head_inputs(hidden: Tensor, bias: Tensor | None, ids: Tensor, mask: Tensor,
                       temperature: float) -> tuple[Tensor, Tensor | None, Tensor]:
    """(hidden / temperature, bias / temperature, ids with the tokens outside mask labelled -100): a fused head's
    inputs for softmax(logits / temperature) over the masked tokens."""
    if mask.shape != ids.shape:
        raise ValueError(f"mask must have the shape of ids {tuple(ids.shape)}, got {tuple(mask.shape)}")
    check_number("temperature", temperature)
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = None if bias is None else bias / temperature
    return hidden, bias, ids.masked_fill(~mask.bool(), -100)


def check_completions(token_logps: Tensor, mask: Tensor, name: str = "policy_token_logps") -> Tensor:
    """mask as token_logps' dtype, after checking that both are (batch, tokens) alike and no sequence is empty."""
    if token_logps.dim() != 2:
        raise ValueError(f"{name} must be (batch, tokens), got {tuple(token_logps.shape)}")
    if mask.shape != token_logps.shape:
        raise ValueError(f"mask must have the shape of {name} {tuple(token_logps.shape)}, got {tuple(mask.shape)}")
    empty = (mask.sum(1) == 0).nonzero().flatten()
    if len(empty):
        raise ValueError(f"mask selects no completion token in rows {empty.tolist()}: every sequence needs one")
    return mask.to(token_logps.dtype)


def sequence_logps(token_logps: Tensor, mask: Tensor, ld_alpha: float | None = None) -> Tensor:
    """Per-sequence sums of (batch, tokens) log-probabilities over `mask`; with ld_alpha (LD-DPO), the tokens past
    the shorter completion of each pair count ld_alpha times."""
    if ld_alpha is None:
        return (token_logps * mask).sum(1)
    position = mask.cumsum(1)
    chosen_len, rejected_len = mask.sum(1).long().chunk(2)
    shared = torch.minimum(chosen_len, rejected_len).repeat(2).unsqueeze(1)
    shared_mask = (position > 0) & (position <= shared) & mask.bool()
    tail_mask = (position > shared) & mask.bool()
    return (token_logps * shared_mask).sum(1) + ld_alpha * (token_logps * tail_mask).sum(1)


def _scores(logratios: Tensor, config: DPOLossConfig) -> Tensor:
    kind = config.f_divergence_type
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(config.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a = config.f_alpha_divergence_coef
        return (torch.exp(torch.clamp((a - 1.0) * logratios.float(), max=80.0)) - 1.0).to(logratios.dtype) / (a - 1.0)
    return logratios


def dpo_loss(policy_token_logps: Tensor, ref_logps: Tensor, mask: Tensor, config: DPOLossConfig
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) for policy log-probabilities (2B, T) and reference ones, per token (2B, T) or per sequence
    (2B,), over the completion mask (2B, T). Metrics: rewards/chosen, rewards/rejected, rewards/margins,
    rewards/accuracies, logps/chosen, logps/rejected (means, as TRL logs them)."""
    if policy_token_logps.dim() != 2 or policy_token_logps.shape[0] % 2:
        raise ValueError(f"policy_token_logps must be (2 * pairs, tokens) with chosen rows first, got "
                         f"{tuple(policy_token_logps.shape)}")
    mask = check_completions(policy_token_logps, mask)
    if ref_logps.shape not in (policy_token_logps.shape, policy_token_logps.shape[:1]):
        raise ValueError(f"ref_logps must be per token {tuple(policy_token_logps.shape)} or per sequence "
                         f"({policy_token_logps.shape[0]},), got {tuple(ref_logps.shape)}")
    logps = sequence_logps(policy_token_logps, mask, config.ld_alpha)
    ref = ref_logps if ref_logps.dim() == 1 else sequence_logps(ref_logps, mask, config.ld_alpha)
    chosen, rejected = logps.chunk(2)
    ref_chosen, ref_rejected = ref.chunk(2)
    chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
    chosen_score, rejected_score = _scores(chosen_ratio, config), _scores(rejected_ratio, config)
    delta = chosen_score - rejected_score
    beta, eps = config.beta, config.label_smoothing
    chosen_len, rejected_len = mask.sum(1).clamp(min=1.0).chunk(2)
    loss = 0.0
    for loss_type, weight in zip(config.loss_type, config.loss_weights):
        if loss_type == "sigmoid":
            per = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            per = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            per = (chosen_score / chosen_len - rejected_score / rejected_len - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            z = beta * delta
            per = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps)) + torch.sigmoid(-z) * (
                F.logsigmoid(-z) - math.log(eps))
        elif loss_type == "nca_pair":
            per = (-F.logsigmoid(beta * chosen_ratio) - 0.5 * F.logsigmoid(-beta * chosen_ratio)
                   - 0.5 * F.logsigmoid(-beta * rejected_ratio))
        elif loss_type == "robust":
            per = (-(1 - eps) * F.logsigmoid(beta * delta) + eps * F.logsigmoid(-beta * delta)) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            per = -F.logsigmoid(beta * chosen_ratio) - F.logsigmoid(-beta * rejected_ratio)
        elif loss_type == "sppo_hard":
            per = (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
        elif loss_type in ("aot", "aot_unpaired"):
            if loss_type == "aot":
                d = torch.sort(chosen - rejected).values - torch.sort(ref_chosen - ref_rejected).values
            else:
                d = torch.sort(chosen_ratio).values - torch.sort(rejected_ratio).values
            per = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
        elif loss_type == "apo_zero":
            per = 1 - torch.sigmoid(beta * chosen_ratio) + torch.sigmoid(beta * rejected_ratio)
        elif loss_type == "apo_down":
            per = torch.sigmoid(beta * chosen_ratio) + 1 - torch.sigmoid(beta * (chosen_ratio - rejected_ratio))
        elif loss_type == "discopop":
            z = beta * delta
            gate = torch.sigmoid(z / config.discopop_tau)
            per = -F.logsigmoid(z) * (1 - gate) + torch.exp(-z) * gate
        elif loss_type == "sft":
            chosen_mask = mask.chunk(2)[0].bool()
            per = -policy_token_logps.chunk(2)[0][chosen_mask].mean().expand(chosen.shape[0])
        else:  # sigmoid_norm
            per = -F.logsigmoid(beta * (chosen_score / chosen_len - rejected_score / rejected_len))
        loss = loss + per.mean() * weight
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {"rewards/chosen": chosen_reward.mean(), "rewards/rejected": rejected_reward.mean(),
               "rewards/margins": (chosen_reward - rejected_reward).mean(),
               "rewards/accuracies": (chosen_reward > rejected_reward).float().mean(),
               "logps/chosen": chosen.detach().mean(), "logps/rejected": rejected.detach().mean()}
    return loss, metrics


@dataclass
class KTOLossConfig:
    """TRL's KTOConfig fields the loss reads (same names and defaults)."""

    beta: float = 0.1
    loss_type: str = "kto"
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0

    def __post_init__(self):
        if self.loss_type not in KTO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {self.loss_type!r}")
        for name in ("beta", "desirable_weight", "undesirable_weight"):
            check_number(name, getattr(self, name))


def _per_sequence(name: str, logps: Tensor, mask: Tensor | None, rows: int) -> Tensor:
    if logps.dim() == 1 and logps.shape[0] == rows:
        return logps
    if logps.dim() == 2 and mask is not None and logps.shape == mask.shape:
        return (logps * mask).sum(1)
    raise ValueError(f"{name} must be per sequence ({rows},) or per token shaped like mask "
                     f"{None if mask is None else tuple(mask.shape)}, got {tuple(logps.shape)}")


def kto_loss(policy_logps: Tensor, ref_logps: Tensor, desirable: Tensor, config: KTOLossConfig, *,
             mask: Tensor | None = None, kl_logps: Tensor | None = None, ref_kl_logps: Tensor | None = None
             ) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) of KTO for unpaired completions: policy and reference log-probabilities per token (batch,
    tokens) over `mask`, or per sequence (batch,); desirable (batch,) bool, True for a desirable completion.
    "kto" needs the KL estimate's inputs: kl_logps and ref_kl_logps (batch,), the policy's (no gradient) and the
    reference's sequence log-probabilities of mismatched completions (TRL pairs each prompt with its neighbour's
    completion); the estimate is their mean difference, detached and clamped at 0. Metrics (TRL's names): kl,
    rewards/chosen, rewards/rejected, rewards/margins, logps/chosen, logps/rejected (means over the desirable /
    undesirable rows present)."""
    if desirable.dim() != 1 or desirable.dtype != torch.bool:
        raise ValueError(f"desirable must be a 1-D bool tensor, got {desirable.dtype} {tuple(desirable.shape)}")
    rows = desirable.shape[0]
    if rows == 0:
        raise ValueError("desirable is empty: the batch has no completion")
    if mask is not None:
        mask = check_completions(policy_logps, mask, "policy_logps")
    logps = _per_sequence("policy_logps", policy_logps, mask, rows)
    ref = _per_sequence("ref_logps", ref_logps, mask, rows)
    if config.loss_type == "kto":
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("loss_type 'kto' needs kl_logps and ref_kl_logps (the KL estimate's completions)")
        if kl_logps.shape != ref_kl_logps.shape or kl_logps.dim() != 1:
            raise ValueError(f"kl_logps and ref_kl_logps must be (batch,) alike, got {tuple(kl_logps.shape)} and "
                             f"{tuple(ref_kl_logps.shape)}")
        kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), dtype=logps.dtype, device=logps.device)
    ratio = logps - ref
    chosen, rejected = ratio[desirable], ratio[~desirable]
    beta = config.beta
    if config.loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected))
    else:  # apo_zero_unpaired
        chosen_losses = 1 - torch.sigmoid(beta * chosen)
        rejected_losses = torch.sigmoid(beta * rejected)
    loss = torch.cat([config.desirable_weight * chosen_losses, config.undesirable_weight * rejected_losses]).mean()
    metrics = {"kl": kl}
    for side, part, seq in (("chosen", chosen, logps[desirable]), ("rejected", rejected, logps[~desirable])):
        if part.numel():
            metrics[f"rewards/{side}"] = beta * part.detach().mean()
            metrics[f"logps/{side}"] = seq.detach().mean()
    if chosen.numel() and rejected.numel():
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    return loss, metrics


def dpo_loss_from_hidden(hidden: Tensor, weight: Tensor, ids: Tensor, mask: Tensor, ref_logps: Tensor,
                         config: DPOLossConfig, *, bias: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """dpo_loss on head_logps(hidden, weight, ids, mask) (chosen rows first): no (tokens, vocab) logits."""
    return dpo_loss(head_logps(hidden, weight, ids, mask, bias=bias)[0], ref_logps, mask, config)


def kto_loss_from_hidden(hidden: Tensor, weight: Tensor, ids: Tensor, mask: Tensor, ref_logps: Tensor,
                         desirable: Tensor, config: KTOLossConfig, *, bias: Tensor | None = None,
                         **kwargs) -> tuple[Tensor, dict[str, Tensor]]:
    """kto_loss on head_logps(hidden, weight, ids, mask): no (tokens, vocab) logits. Other keywords (kl_logps,
    ref_kl_logps) go to kto_loss."""
    logps = head_logps(hidden, weight, ids, mask, bias=bias)[0]
    return kto_loss(logps, ref_logps, desirable, config, mask=mask, **kwargs)
