"""What patches other libraries' objects: peft (LoRA layers), bitsandbytes (4-bit layers), torchao (QAT layers),
transformers (a causal LM's loss), TRL trainers (their fused LM head), through `patch` / `unpatch`."""

from fastft.integrations.peft import PatchReport
from fastft.integrations.peft import patch as _patch_model
from fastft.integrations.peft import unpatch as _unpatch_model
from fastft.integrations.peft_nf4 import LoraNF4Linear, lora_config_for_nf4

__all__ = ["LoraNF4Linear", "PatchReport", "lora_config_for_nf4", "patch", "quantize_model", "unpatch"]


def patch(target, **options):
    """`fastft.patch(model, ...)` (fastft/integrations/peft.py) on a model; on a transformers / TRL Trainer, the
    trainer's models and TRL's fused LM head (fastft/integrations/trl.py; ORPOTrainer / CPOTrainer's log-probabilities:
    trl_pairwise.py), returning a TrainerPatchReport."""
    from fastft.integrations.trl import is_trainer, patch_trainer
    from fastft.integrations.trl_pairwise import pairwise_kind, patch_pairwise_trainer

    if is_trainer(target):
        return (patch_pairwise_trainer if pairwise_kind(target) else patch_trainer)(target, **options)
    return _patch_model(target, **options)


def unpatch(target) -> int:
    """Undo `patch` on a model or a trainer; returns how many modules came back."""
    from fastft.integrations.trl import is_trainer, unpatch_trainer
    from fastft.integrations.trl_pairwise import pairwise_kind, unpatch_pairwise_trainer

    if is_trainer(target):
        return (unpatch_pairwise_trainer if pairwise_kind(target) else unpatch_trainer)(target)
    return _unpatch_model(target)


def __getattr__(name):
    # quantize_model is a recipe (fastft/methods/quantize.py); this path is kept for compatibility.
    if name == "quantize_model":
        from fastft.methods.quantize import quantize_model

        return quantize_model
    raise AttributeError(f"module 'fastft.integrations' has no attribute {name!r}")
