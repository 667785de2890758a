"""`fastft.patch(trainer)` for TRL 1.16's ORPOTrainer and CPOTrainer (trl.experimental), which build full logits.

Both compute their losses from `concatenated_forward(model, batch)`: the model's (2 * pairs, tokens, V) logits,
each completion's log-probability (summed, or averaged over its tokens: ORPO, CPO's ipo / simpo), the chosen
rows' NLL (ORPO over the whole chosen sequence, CPO over its completion, skipped at cpo_alpha 0) and, for logging
only, the logits' means. The patch replaces that method on the trainer instance by one that asks the model for
fastft's log-probabilities instead (the fused head of fastft/integrations/trl.py, installed on the model and called
through the model's forward, so DDP and peft wrappers see the call): only the scored rows go through the head, no
(tokens, vocab) logits exist, and the logits' means come from the hidden states (h . mean(W) + mean(b)), handed to
TRL as 0-dim tensors (TRL only takes their .mean()). TRL's loss code and metrics run unchanged.
Left to TRL, with the reason in the report: encoder-decoder models, MoE router losses, logit soft-capping, prompt
learning (virtual tokens shift the positions).
"""

from __future__ import annotations

import types

import torch
from torch import nn

from fastft.integrations.peft import patch as patch_model
from fastft.integrations.peft import unpatch as unpatch_model
from fastft.integrations.trl import TrainerPatchReport, install_head, unpatch_trl_head

_TRAINERS = ("ORPOTrainer", "CPOTrainer")


def pairwise_kind(trainer) -> str | None:
    """"ORPOTrainer" or "CPOTrainer" when `trainer` is (a subclass of) TRL's, else None."""
    for cls in type(trainer).__mro__:
        if cls.__name__ in _TRAINERS and cls.__module__.startswith("trl."):
            return cls.__name__
    return None


def _decline_reason(trainer, base: nn.Module) -> str | None:
    if getattr(trainer, "is_encoder_decoder", False):
        return "encoder-decoder model"
    if getattr(trainer, "aux_loss_enabled", False):
        return "MoE router losses (output_router_logits) are left to the model's forward"
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    if getattr(config, "final_logit_softcapping", None) is not None:
        return "the model soft-caps its logits"
    peft_config = getattr(trainer.model, "active_peft_config", None)
    if getattr(peft_config, "is_prompt_learning", False):
        return "prompt learning (virtual tokens shift the positions)"
    if not isinstance(getattr(base, base.base_model_prefix, None), nn.Module):
        return f"no backbone at {type(base).__name__}.{base.base_model_prefix}"
    return None


def _concatenated_forward(self, model, batch):
    """TRL's concatenated_forward (ORPOTrainer / CPOTrainer) on fastft's log-probabilities: (chosen log-probs,
    rejected log-probs, chosen mean logit, rejected mean logit, chosen NLL)."""
    kind = pairwise_kind(self)
    pad = self.padding_value if kind == "ORPOTrainer" else self.pad_token_id
    c = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad, device=self.accelerator.device)
    ids, attention, labels = c["concatenated_input_ids"], c["concatenated_attention_mask"], c["concatenated_labels"]
    pairs = batch["chosen_labels"].shape[0]
    completion = labels[:, 1:] != -100
    if kind == "ORPOTrainer":
        nll_mask, average = attention[:pairs, 1:].bool(), True
    else:
        nll_mask = completion[:pairs] if self.cpo_alpha != 0 else None
        average = self.loss_type in ("ipo", "simpo")
    scored = completion.clone()
    if nll_mask is not None:
        scored[:pairs] |= nll_mask
    # labels aligned with every position (the last one predicts nothing): the head's mean logits cover all
    shift_labels = torch.full_like(ids, -100)
    shift_labels[:, :-1] = ids[:, 1:].masked_fill(~scored, -100)
    out = model(ids, attention_mask=attention, use_cache=False, fused_lm_head=True, shift_labels=shift_labels,
                _fastft_all_mean_logits=True)
    logps = out.log_probs[:, :-1]
    sequence = (logps * completion).sum(-1)
    if average:
        sequence = sequence / completion.sum(-1)
    if nll_mask is None:
        nll = torch.tensor(0.0, device=logps.device)
    else:
        nll = -(logps[:pairs] * nll_mask).sum() / nll_mask.sum()
    # TRL logs the mean of logits[:, :-1] (ORPO) or of all positions' logits (CPO)
    means = out.mean_logits[:, :-1] if kind == "ORPOTrainer" else out.mean_logits
    return sequence[:pairs], sequence[pairs:], means[:pairs].mean(), means[pairs:].mean(), nll


def _base(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def patch_pairwise_trainer(trainer, **options) -> TrainerPatchReport:
    """Patch an ORPOTrainer / CPOTrainer's model as `fastft.patch(model, **options)` does and its
    concatenated_forward (see the module doc)."""
    report = TrainerPatchReport(model=patch_model(trainer.model, **options))
    name = f"{pairwise_kind(trainer)}.concatenated_forward ({type(_base(trainer.model)).__name__})"
    report.heads[name] = patch_pairwise(trainer)
    return report


def unpatch_pairwise_trainer(trainer) -> int:
    """Undo `patch_pairwise_trainer`; returns how many modules (and methods) came back."""
    return int(unpatch_pairwise(trainer)) + unpatch_model(trainer.model)


def patch_pairwise(trainer) -> str:
    """Put fastft's log-probabilities under an ORPOTrainer / CPOTrainer's concatenated_forward; returns what runs
    now: "fastft::fused_linear_logprobs", or the model's forward and why."""
    base = _base(trainer.model)
    if "_fastft_trl_head" in base.__dict__:
        return "fastft::fused_linear_logprobs"
    reason = _decline_reason(trainer, base)
    if reason is not None:
        return f"TRL's logits path runs ({reason})"
    install_head(base, {"temperature": 1.0, "logit_scale": 1.0, "outputs": {"log_probs", "mean_logits"},
                        "backbone_attr": base.base_model_prefix})
    trainer.concatenated_forward = types.MethodType(_concatenated_forward, trainer)
    return "fastft::fused_linear_logprobs"


def unpatch_pairwise(trainer) -> bool:
    """Give the trainer TRL's concatenated_forward back; whether it had fastft's."""
    if trainer.__dict__.pop("concatenated_forward", None) is None:
        return False
    unpatch_trl_head(_base(trainer.model))
    return True
