"""`fastft.patch(model, fused_loss=True)`: a transformers causal LM's training loss computed from its last hidden
states by `fastft.losses.fused_linear_cross_entropy`, so the (tokens, vocab) fp32 logits, their log-softmax and
their gradient (three tensors of tokens x vocab x 4 bytes each in transformers' loss) never exist.

The class of the causal-LM instance is swapped for a subclass (per instance, reversible). When labels are given and
a backward may follow (training mode, or gradients enabled: an eval-mode Fisher estimate, a training loop that never
called model.train() on a model from from_pretrained, which returns eval mode), its forward runs the decoder under
lm_head (`model.base_model`) and the fused loss on its last hidden states, and returns `logits=None` (as
Liger-Kernel's fused cross-entropy does in training); in eval mode under torch.no_grad (evaluation: transformers'
loss and the logits), without labels, or with arguments it does not handle, it is transformers' own forward. Only
model types whose logits are exactly `lm_head(last hidden state)` are patched (no logit scaling or soft-capping).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastft.integrations.class_swap import original_class, swap_class
from fastft.losses import fused_linear_cross_entropy

# config.model_type of causal LMs whose forward is: hidden = model(...).last_hidden_state; logits = lm_head(hidden);
# loss = ForCausalLMLoss(logits, labels) (labels shifted by one, ignore_index -100).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def _fused_loss_forward(self, *args, labels=None, **kwargs):
    original = original_class(self)
    if (labels is None or not (self.training or torch.is_grad_enabled()) or args
            or kwargs.get("return_dict") is False or kwargs.get("logits_to_keep", 0) != 0):
        return original.forward(self, *args, labels=labels, **kwargs)
    from transformers.modeling_outputs import CausalLMOutputWithPast

    from fastft.integrations.heads import gather_in_backward, head_weight

    num_items_in_batch = kwargs.pop("num_items_in_batch", None)
    shift_labels = kwargs.pop("shift_labels", None)
    ignore_index = kwargs.pop("ignore_index", -100)
    wants_hidden_states = kwargs.pop("output_hidden_states", False)
    kwargs.pop("logits_to_keep", None)  # 0 here: the decoder takes no such argument
    # The supported forwards run lm_head on the decoder's last hidden state: that is the loss's input. Hidden states
    # are collected only when the caller asks (transformers then hooks closures on the layers, which pickle refuses).
    outputs = self.base_model(output_hidden_states=wants_hidden_states, **kwargs)
    hidden = outputs.last_hidden_state
    if shift_labels is None:  # position t predicts token t + 1, as transformers' ForCausalLMLoss
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    head = self.get_output_embeddings()
    weight, bias = head_weight(head)
    loss = fused_linear_cross_entropy(hidden, weight, shift_labels.to(hidden.device), bias=bias,
                                      ignore_index=ignore_index, num_items_in_batch=num_items_in_batch)
    gather_in_backward(head, loss)
    return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=outputs.past_key_values,
                                  hidden_states=outputs.hidden_states if wants_hidden_states else None,
                                  attentions=outputs.attentions)


def patch_causal_lm_loss(model: nn.Module, report) -> None:
    """Swap the class of the transformers causal LMs in `model` (itself, or inside a PeftModel) for fused-loss
    subclasses, recording them (or why not) in `report` (a PatchReport)."""
    from transformers import PreTrainedModel
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    causal_lm_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for name, module in model.named_modules():
        if original_class(module) is not None and isinstance(module, PreTrainedModel):
            report.fused["causal LM loss (fused linear cross-entropy)"] += 1
            continue
        if not isinstance(module, PreTrainedModel) or type(module).__name__ not in causal_lm_classes:
            continue
        model_type = getattr(module.config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            report.unfused[name or type(module).__name__] = (
                f"loss: model type {model_type!r} is not one whose logits are exactly lm_head(last hidden state) "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})")
            continue
        swap_class(module, _fused_loss_forward, "fastft's fused linear cross-entropy as its training loss")
        report.fused["causal LM loss (fused linear cross-entropy)"] += 1
        if "forward" in module.__dict__ and "_fastft_trl_head" not in module.__dict__:
            report.unfused[name or type(module).__name__] = (
                "loss: an instance forward (TRL's fused LM head, add_fused_lm_head) overrides the class's: the "
                "trainer's fused_lm_head=True calls run TRL's head, not fastft's loss; fastft.patch(trainer) puts "
                "fastft's head in its place")

