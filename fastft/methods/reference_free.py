"""Preference losses without a reference model, as plain torch on per-token log-probabilities (2 * pairs, tokens)
with the chosen rows first, e.g. from `fastft.losses.fused_linear_logprobs` (0 on ignored tokens): ORPO (odds-ratio
term + the chosen sequences' NLL) and CPO with every loss type of TRL 1.16's CPOConfig (sigmoid, hinge, ipo, simpo;
SimPO is CPOLossConfig(loss_type="simpo", cpo_alpha=0.0), AlphaPO loss_type="alphapo" or alpha != 0), with the
formulas of TRL's ORPOTrainer / CPOTrainer (trl.experimental; checked in tests/methods/test_reference_free.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from fastft.methods.common import check_number
from fastft.methods.preference import check_completions, head_logps

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def _pairs(policy_token_logps: Tensor, mask: Tensor) -> Tensor:
    if policy_token_logps.dim() != 2 or policy_token_logps.shape[0] % 2:
        raise ValueError(f"policy_token_logps must be (2 * pairs, tokens) with chosen rows first, got "
                         f"{tuple(policy_token_logps.shape)}")
    return check_completions(policy_token_logps, mask)


def _chosen_nll(policy_token_logps: Tensor, nll_mask: Tensor) -> Tensor:
    """The mean negative log-likelihood of the chosen rows over nll_mask (pairs or 2 * pairs rows, tokens)."""
    chosen = policy_token_logps[: policy_token_logps.shape[0] // 2]
    if nll_mask.shape == policy_token_logps.shape:
        nll_mask = nll_mask[: chosen.shape[0]]
    if nll_mask.shape != chosen.shape:
        raise ValueError(f"nll_mask must be (pairs or 2 * pairs, {chosen.shape[1]}), got {tuple(nll_mask.shape)}")
    nll_mask = nll_mask.to(chosen.dtype)
    count = nll_mask.sum()
    if count == 0:
        raise ValueError("nll_mask selects no token of the chosen sequences")
    return -(chosen * nll_mask).sum() / count


@dataclass
class ORPOLossConfig:
    """TRL's ORPOConfig field the loss reads (same name and default): beta, the odds-ratio term's weight (0: the
    chosen NLL alone)."""

    beta: float = 0.1

    def __post_init__(self):
        check_number("beta", self.beta, allow_zero=True)


def orpo_loss(policy_token_logps: Tensor, mask: Tensor, config: ORPOLossConfig, *, nll_mask: Tensor | None = None
              ) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) of ORPO: NLL of the chosen rows - beta * mean log sigmoid(log odds(chosen) - log odds(rejected)),
    with log odds(y) = log p - log(1 - p) of each completion's mean token log-probability p over `mask` (2 * pairs,
    tokens). The NLL averages the chosen rows' tokens over nll_mask (None: mask); TRL's ORPOTrainer takes the whole
    chosen sequence, prompt included (attention_mask[:, 1:]), so pass log-probabilities of the prompt tokens too.
    Metrics (TRL's names): rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected, nll_loss, log_odds_ratio, log_odds_chosen."""
    mask = _pairs(policy_token_logps, mask)
    nll = _chosen_nll(policy_token_logps, mask if nll_mask is None else nll_mask)
    mean_logps = ((policy_token_logps * mask).sum(1) / mask.sum(1)).float()
    chosen, rejected = mean_logps.chunk(2)
    # log(1 - exp(x)) for x <= 0, stable on both sides of -log 2
    log1mexp = lambda x: torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)),  # noqa: E731
                                     torch.log(-torch.expm1(x)))
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    ratio = F.logsigmoid(log_odds)
    loss = nll - config.beta * ratio.mean()
    metrics = _reward_metrics(config.beta * chosen.detach(), config.beta * rejected.detach(), chosen, rejected, nll)
    metrics.update({"log_odds_ratio": ratio.detach().mean(), "log_odds_chosen": log_odds.detach().mean()})
    return loss, metrics


def _reward_metrics(chosen_rewards, rejected_rewards, chosen, rejected, nll) -> dict[str, Tensor]:
    return {"rewards/chosen": chosen_rewards.mean(), "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/rejected": rejected.detach().mean(), "logps/chosen": chosen.detach().mean(),
            "nll_loss": nll.detach()}


@dataclass
class CPOLossConfig:
    """TRL's CPOConfig fields the loss reads (same names and defaults); loss_type "alphapo" becomes "simpo" with
    cpo_alpha 0, as in TRL. label_smoothing acts on sigmoid and simpo only (TRL ignores it for hinge and ipo)."""

    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    cpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    alpha: float = 0.0

    def __post_init__(self):
        if self.loss_type == "alphapo":
            self.loss_type, self.cpo_alpha = "simpo", 0.0
        if self.loss_type not in CPO_LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {CPO_LOSS_TYPES} or 'alphapo', got {self.loss_type!r}")
        check_number("beta", self.beta)
        check_number("cpo_alpha", self.cpo_alpha, allow_zero=True)
        check_number("simpo_gamma", self.simpo_gamma, allow_zero=True)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if not isinstance(self.alpha, (int, float)) or not abs(self.alpha) < float("inf"):
            raise ValueError(f"alpha must be a finite number, got {self.alpha!r}")


def cpo_loss(policy_token_logps: Tensor, mask: Tensor, config: CPOLossConfig) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss, metrics) of CPO / SimPO / AlphaPO: the pairwise loss of each completion's log-probability over
    `mask` (2 * pairs, tokens), summed (sigmoid, hinge) or averaged over its tokens (ipo, simpo), plus cpo_alpha
    times the chosen rows' mean NLL over the same mask. With alpha != 0 each completion's reward is
    (1 - p^-alpha) / alpha of its probability p (AlphaPO). Metrics (TRL's names): rewards/chosen,
    rewards/rejected, rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, nll_loss."""
    mask = _pairs(policy_token_logps, mask)
    logps = (policy_token_logps * mask).sum(1)
    if config.loss_type in ("ipo", "simpo"):
        logps = logps / mask.sum(1)
    chosen, rejected = logps.chunk(2)
    if config.alpha != 0.0:
        chosen_reward = (1 - torch.exp(chosen).pow(-config.alpha)) / config.alpha
        rejected_reward = (1 - torch.exp(rejected).pow(-config.alpha)) / config.alpha
    else:
        chosen_reward, rejected_reward = chosen, rejected
    z = chosen_reward - rejected_reward
    beta, eps = config.beta, config.label_smoothing
    if config.loss_type in ("sigmoid", "simpo"):
        if config.loss_type == "simpo":
            z = z - config.simpo_gamma / beta
        losses = -F.logsigmoid(beta * z) * (1 - eps) - F.logsigmoid(-beta * z) * eps
    elif config.loss_type == "hinge":
        losses = torch.relu(1 - beta * z)
    else:  # ipo
        losses = (z - 1 / (2 * beta)) ** 2
    if config.cpo_alpha == 0:
        nll = torch.zeros((), dtype=logps.dtype, device=logps.device)
    else:
        nll = _chosen_nll(policy_token_logps, mask)
    loss = losses.mean() + config.cpo_alpha * nll
    metrics = _reward_metrics(beta * chosen_reward.detach(), beta * rejected_reward.detach(), chosen, rejected, nll)
    return loss, metrics


def orpo_loss_from_hidden(hidden: Tensor, weight: Tensor, ids: Tensor, mask: Tensor, config: ORPOLossConfig, *,
                          nll_mask: Tensor | None = None, bias: Tensor | None = None
                          ) -> tuple[Tensor, dict[str, Tensor]]:
    """orpo_loss on head_logps(hidden, weight, ids, mask | nll_mask): no (tokens, vocab) logits."""
    scored = mask if nll_mask is None else mask.bool() | _padded(nll_mask, mask).bool()
    return orpo_loss(head_logps(hidden, weight, ids, scored, bias=bias)[0], mask, config, nll_mask=nll_mask)


def _padded(nll_mask: Tensor, mask: Tensor) -> Tensor:
    """nll_mask of the chosen rows only, padded with the rejected rows' zeros to mask's shape."""
    if nll_mask.shape[0] * 2 == mask.shape[0]:
        return torch.cat([nll_mask, torch.zeros_like(nll_mask)])
    return nll_mask


def cpo_loss_from_hidden(hidden: Tensor, weight: Tensor, ids: Tensor, mask: Tensor, config: CPOLossConfig, *,
                         bias: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """cpo_loss on head_logps(hidden, weight, ids, mask): no (tokens, vocab) logits."""
    return cpo_loss(head_logps(hidden, weight, ids, mask, bias=bias)[0], mask, config)
