"""`fastft.patch(trainer)` for TRL trainers (SFTTrainer, DPOTrainer, GRPOTrainer, KTOTrainer, RLOOTrainer, and any
trainer that gives its models TRL's fused LM head; ORPOTrainer and CPOTrainer, which have none, through
fastft/integrations/trl_pairwise.py).

TRL 1.16 installs a chunked log-probability head on the models it trains (`trl.trainer.utils.add_fused_lm_head`,
an instance attribute `forward`): calls with `fused_lm_head=True` return per-token log-probabilities, entropies and
metric fields (a `FusedCausalLMOutput`) instead of logits, and every TRL loss (SFT's NLL / DFT, DPO's loss types,
GRPO's, KTO's) is computed from them. That head shadows the model class's forward, so a model patched with
`fastft.patch(model, fused_loss=True)` never runs fastft's loss inside such a trainer.

`patch(trainer)` patches the trainer's model (and its separate reference model) as `fastft.patch(model)` does
(fused LoRA / NF4 layers) and replaces TRL's head on each model that has one by fastft's: the same
`FusedCausalLMOutput` fields, computed by `fastft::fused_linear_logprobs` from the last hidden states, so TRL's
losses and metrics run unchanged on them. Differences from TRL's head, by design:
- rows labelled -100 are dropped before the head matmul on every device (TRL's head scores every row off Triton
  devices, e.g. on CPU);
- a LoRA on lm_head (peft `modules_to_save` / target lm_head) is applied (TRL's head reads the base weight only);
- `is_top1` counts a label tied with the most likely token as top-1 (TRL breaks ties towards the first index).
Heads fastft cannot take over stay TRL's, and the report says why: logit soft-capping, MoE router losses
(`output_router_logits`), `log_sum_sq_probs` (DPO's `use_weighting`).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fastft.integrations.peft import PatchReport
from fastft.integrations.peft import patch as patch_model
from fastft.integrations.peft import unpatch as unpatch_model

_SUPPORTED_OUTPUTS = {"log_probs", "entropy", "mean_logits", "is_top1"}


@dataclass
class TrainerPatchReport:
    """`patch(trainer)`'s report: the model's (and the reference model's) PatchReport, and per model with TRL's
    fused LM head whether fastft's head replaced it or why not."""

    model: PatchReport
    ref_model: PatchReport | None = None
    heads: dict[str, str] = field(default_factory=dict)

    @property
    def fused_heads(self) -> int:
        return sum(state.startswith("fastft") for state in self.heads.values())

    def __str__(self) -> str:
        lines = [str(self.model)]
        if self.ref_model is not None:
            lines += ["reference model: " + str(self.ref_model)]
        lines.append(f"TRL fused LM heads: {self.fused_heads} of {len(self.heads)} on fastft::fused_linear_logprobs")
        lines += [f"  {name}: {state}" for name, state in self.heads.items()]
        return "\n".join(lines)


def is_trainer(obj) -> bool:
    try:
        from transformers import Trainer
    except ImportError:
        return False
    return isinstance(obj, Trainer)


def _closure(fn) -> dict:
    code = getattr(fn, "__code__", None)
    if code is None or fn.__closure__ is None:
        return {}
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, fn.__closure__)}


def trl_head_options(model: nn.Module) -> dict | None:
    """The options TRL's `add_fused_lm_head` gave `model` (temperature, outputs, ...), or None when it has none."""
    forward = model.__dict__.get("forward")
    fn = getattr(forward, "__func__", None)
    # functools.wraps gives it the model class's __module__: recognise it by its code's name and file
    if fn is None or fn.__code__.co_name != "_fused_forward" or "trl" not in Path(fn.__code__.co_filename).parts:
        return None
    return _closure(fn)


def _decline_reason(model: nn.Module, options: dict) -> str | None:
    missing = {"original_forward", "temperature", "outputs", "logit_scale", "backbone_attr"} - options.keys()
    if missing:
        return f"this TRL version's fused head keeps no {sorted(missing)}"
    if options.get("final_logit_softcapping") is not None:
        return "the model soft-caps its logits"
    extra = set(options["outputs"]) - _SUPPORTED_OUTPUTS
    if extra:
        return f"the trainer asks for {sorted(extra)} (DPO's use_weighting), which fastft's head does not compute"
    if getattr(options.get("text_config"), "output_router_logits", False):
        return "MoE router losses (output_router_logits) are left to TRL's head"
    return None


def _fastft_forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                    _fastft_all_mean_logits=False, **kwargs):
    """TRL's fused-head contract (trl.trainer.utils.add_fused_lm_head) on fastft::fused_linear_logprobs;
    _fastft_all_mean_logits (fastft/integrations/trl_pairwise.py) keeps mean_logits on rows labelled -100 too."""
    options = self._fastft_trl_head
    if not fused_lm_head:
        for name, value in (("labels", labels), ("shift_labels", shift_labels),
                            ("num_items_in_batch", num_items_in_batch)):
            if value is not None:
                kwargs[name] = value
        return type(self).forward(self, *args, **kwargs)  # the class's forward: fastft's fused loss if patched
    from trl.trainer.utils import FusedCausalLMOutput

    from fastft.integrations.heads import gather_in_backward, head_weight
    from fastft.losses import fused_linear_logprobs

    kwargs["use_cache"] = False
    hidden = getattr(self, options["backbone_attr"])(*args, **kwargs).last_hidden_state
    if shift_labels is None:
        hidden, labels = hidden[:, :-1], labels[:, 1:]
    else:
        labels = shift_labels
    head = self.get_output_embeddings()
    weight, bias = head_weight(head)
    hidden = hidden.to(weight.device)
    labels = labels.to(weight.device)
    scale = float(options["logit_scale"]) / float(options["temperature"])
    if scale != 1.0:  # logits * scale = (scale h) W^T + scale b
        hidden = hidden * scale
        bias = None if bias is None else bias * scale
    outputs = options["outputs"]
    with torch.autocast(hidden.device.type, enabled=False):
        out = fused_linear_logprobs(hidden, weight, labels, bias=bias, entropy="entropy" in outputs, details=True)
    gather_in_backward(head, out.logprob, out.entropy)
    mask = labels != -100
    mean_logits = is_top1 = None
    if "mean_logits" in outputs:
        with torch.no_grad():
            mean_logits = hidden.detach().float() @ weight.detach().float().mean(0)
            if bias is not None:
                mean_logits = mean_logits + bias.detach().float().mean()
            if not _fastft_all_mean_logits:
                mean_logits = mean_logits.masked_fill(~mask, 0)
    if "is_top1" in outputs:
        is_top1 = (out.logprob >= out.top) & mask
    loss = -out.logprob.sum() / (mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch)
    return FusedCausalLMOutput(loss=loss, log_probs=out.logprob, entropy=out.entropy, mean_logits=mean_logits,
                               is_top1=is_top1, label_mask=mask)


def _head_models(trainer) -> list[tuple[str, nn.Module]]:
    models = []
    for name in ("model", "ref_model"):
        model = getattr(trainer, name, None)
        if model is None:
            continue
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        models.append((name, base))
    return models


def patch_trl_head(model: nn.Module) -> str:
    """Put fastft's fused head in place of TRL's on `model` (a transformers model, not a PeftModel wrapper); returns
    what runs now: "fastft::fused_linear_logprobs", or TRL's head / the model's forward and why."""
    if "_fastft_trl_head" in model.__dict__:
        return "fastft::fused_linear_logprobs"
    head_options = trl_head_options(model)
    if head_options is None:
        return "no TRL fused head on this model: its own forward runs"
    reason = _decline_reason(model, head_options)
    if reason is not None:
        return f"TRL's fused head runs ({reason})"
    install_head(model, head_options)
    return "fastft::fused_linear_logprobs"


def install_head(model: nn.Module, options: dict) -> None:
    """fastft's fused head as `model`'s instance forward, with TRL's head options (temperature, logit_scale,
    outputs, backbone_attr); the forward it shadows (TRL's head, or none) comes back with unpatch_trl_head."""
    model._fastft_trl_head = {**options, "trl_forward": model.__dict__.get("forward")}
    model.forward = types.MethodType(_fastft_forward, model)


def unpatch_trl_head(model: nn.Module) -> bool:
    """Give `model` TRL's fused head back; whether it had fastft's."""
    options = model.__dict__.pop("_fastft_trl_head", None)
    if options is None:
        return False
    if options["trl_forward"] is None:
        del model.forward  # the class's forward again
    else:
        model.forward = options["trl_forward"]
    return True


def patch_trainer(trainer, **options) -> TrainerPatchReport:
    """Patch `trainer.model` (and `trainer.ref_model`) as `fastft.patch(model, **options)` does, and put fastft's
    fused head in place of TRL's on each of them (see the module doc)."""
    report = TrainerPatchReport(model=patch_model(trainer.model, **options))
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None:
        report.ref_model = patch_model(ref_model, **options)
    for name, model in _head_models(trainer):
        report.heads[f"trainer.{name} ({type(model).__name__})"] = patch_trl_head(model)
    return report


def unpatch_trainer(trainer) -> int:
    """Undo `patch_trainer`: TRL's heads and the models' layers come back; returns how many modules."""
    restored = sum(unpatch_trl_head(model) for _, model in _head_models(trainer))
    restored += unpatch_model(trainer.model)
    if getattr(trainer, "ref_model", None) is not None:
        restored += unpatch_model(trainer.ref_model)
    return restored
