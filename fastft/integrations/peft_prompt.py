"""`fastft.patch` for peft's prompt-learning models (PromptTuning, P-tuning, PrefixTuning on a causal LM).

Prompt tuning and P-tuning keep peft's forward (its prompt encoder already runs once per step); the base model
underneath gets whatever else `patch` does (fused loss, 4-bit matmuls). fastft adds the checks peft lacks:
virtual tokens plus the input must fit the model's context (max_position_embeddings).

Prefix tuning, in training, runs fastft's forward instead of peft's:
- the prefix (and its projection MLP, when prefix_projection=True) is computed once for one row and broadcast over
  the batch (an expand, no copy), where peft computes it for every row: the MLP's forward and backward cost drop by
  the batch size, the gradients are the same (autograd sums them over the broadcast);
- the prefix keys/values reach the attention through a read-only cache (`PrefixCache`): each layer's `update`
  returns cat(prefix, new keys) and stores nothing, so a layer recomputed by gradient checkpointing sees exactly
  what it saw in the forward pass. Under gradient checkpointing (which peft refuses for prefix tuning, and with which
  transformers drops past_key_values) the decoder layers are told, for the duration of the call, that they may
  checkpoint with this cache; it needs non-reentrant checkpointing (transformers' default), since the prefix enters
  the layer through a keyword argument.
In eval mode and for generation, peft's own forward runs (a read-only cache cannot grow while decoding).
"""

from __future__ import annotations

import inspect

import torch
from peft import PeftModelForCausalLM, PeftType
from transformers.cache_utils import DynamicCache, DynamicLayer

from fastft.integrations.class_swap import original_class, swap_class

PROMPT_TYPES = (PeftType.PROMPT_TUNING, PeftType.P_TUNING, PeftType.PREFIX_TUNING)


class PrefixLayer(DynamicLayer):
    """One layer's prefix keys and values, (batch, kv_heads, num_virtual_tokens, head_dim) each (views that may
    be expanded over the batch). `update` returns them concatenated before the new states and keeps nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device, self.is_initialized = keys.dtype, keys.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        return torch.cat([self.keys, key_states], dim=-2), torch.cat([self.values, value_states], dim=-2)


class PrefixCache(DynamicCache):
    """A read-only cache holding a prefix per layer (see PrefixLayer)."""

    def __init__(self, layers: list[PrefixLayer]):
        super().__init__()
        self.layers, self.layer_class_to_replicate = layers, None


def prefix_cache(model: PeftModelForCausalLM, batch_size: int) -> PrefixCache:
    """The active prefix adapter's keys and values: its encoder run on one row of virtual tokens, broadcast."""
    config = model.active_peft_config
    encoder = model.prompt_encoder[model.active_adapter]
    tokens = config.num_virtual_tokens
    if config.inference_mode:
        flat = encoder.embedding.weight.unsqueeze(0)
    else:
        ids = model.prompt_tokens[model.active_adapter][:tokens].unsqueeze(0).to(encoder.embedding.weight.device)
        flat = encoder(ids)  # (1, tokens, num_layers * 2 * token_dim)
    if model.base_model_torch_dtype is not None:
        flat = flat.to(model.base_model_torch_dtype)
    heads = config.num_attention_heads
    kv = flat.view(1, tokens, config.num_layers * 2, heads, config.token_dim // heads).permute(2, 0, 3, 1, 4)
    shape = (batch_size, heads, tokens, config.token_dim // heads)
    return PrefixCache([PrefixLayer(kv[2 * i].expand(shape), kv[2 * i + 1].expand(shape))
                        for i in range(config.num_layers)])


def _context_length(model) -> int | None:
    config = model.get_base_model().config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(config, "max_position_embeddings", None)


def _check_length(model, input_ids, inputs_embeds) -> None:
    context = _context_length(model)
    source = input_ids if input_ids is not None else inputs_embeds
    if context is None or source is None:
        return
    tokens = model.active_peft_config.num_virtual_tokens
    if tokens + source.shape[1] > context:
        raise ValueError(f"num_virtual_tokens ({tokens}) + the input's {source.shape[1]} tokens exceed the model's "
                         f"context (max_position_embeddings={context}): shorten the input or the prompt")


def _checkpointed_layers(model) -> list:
    layers = [m for m in model.get_base_model().modules() if getattr(m, "gradient_checkpointing", False)
              and hasattr(type(m), "_can_checkpoint_with_cache")]
    for layer in layers:
        func = getattr(layer, "_gradient_checkpointing_func", None)
        if getattr(func, "keywords", {}).get("use_reentrant", False):
            raise ValueError("prefix tuning with gradient checkpointing needs gradient_checkpointing_kwargs="
                             "{'use_reentrant': False}: the reentrant variant gives no gradient to the prefix, "
                             "which reaches each layer through past_key_values")
    return layers


def _prompt_forward(self, input_ids=None, attention_mask=None, inputs_embeds=None, labels=None,
                    output_attentions=None, output_hidden_states=None, return_dict=None, task_ids=None, **kwargs):
    config = self.active_peft_config
    if config.peft_type in PROMPT_TYPES:
        _check_length(self, input_ids, inputs_embeds)
    if config.peft_type != PeftType.PREFIX_TUNING or not self.training or _prefix_reason(self, config):
        return original_class(self).forward(
            self, input_ids=input_ids, attention_mask=attention_mask, inputs_embeds=inputs_embeds, labels=labels,
            output_attentions=output_attentions, output_hidden_states=output_hidden_states, return_dict=return_dict,
            task_ids=task_ids, **kwargs)
    source = input_ids if input_ids is not None else inputs_embeds
    batch_size = source.shape[0]
    if attention_mask is not None:
        prefix_mask = attention_mask.new_ones(batch_size, config.num_virtual_tokens)
        attention_mask = torch.cat((prefix_mask, attention_mask), dim=1)
    self._adjust_prompt_learning_kwargs(config, kwargs=kwargs)
    kwargs.update(attention_mask=attention_mask, labels=labels, output_attentions=output_attentions,
                  output_hidden_states=output_hidden_states, return_dict=return_dict,
                  past_key_values=prefix_cache(self, batch_size))
    layers = _checkpointed_layers(self)
    for layer in layers:
        layer._can_checkpoint_with_cache = True  # the cache is read-only: the recompute reads the same states
    try:
        return self.base_model(input_ids=input_ids, inputs_embeds=inputs_embeds, **kwargs)
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache


def _prefix_reason(model, config) -> str | None:
    """Why fastft's prefix path does not apply to this model (peft's then runs), or None."""
    from peft.utils import TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING

    model_type = getattr(model.get_base_model().config, "model_type", "")
    if config.num_transformer_submodules != 1:
        return "prefix tuning of an encoder-decoder model"
    if model_type in TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING or model_type.startswith("gemma"):
        return f"prefix tuning of model type {model_type!r}, whose cache peft builds its own way"
    return None


def patch_prompt_learning(model, report) -> None:
    """Swap the class of a prompt-learning PeftModelForCausalLM (`model` itself) for fastft's, recording it (or
    why not) in `report`. Raises ValueError for virtual tokens that cannot work: more than the model's context, or
    prefix tuning on a model whose forward takes no past_key_values."""
    if not isinstance(model, PeftModelForCausalLM) or not model.active_peft_config.is_prompt_learning:
        return
    if original_class(model) is not None:
        report.fused["prompt learning (peft)"] += 1
        return
    for name, config in model.peft_config.items():
        if config.peft_type not in PROMPT_TYPES:
            report.unfused[f"adapter {name}"] = f"{config.peft_type.value} keeps peft's forward"
            continue
        context = _context_length(model)
        if context is not None and config.num_virtual_tokens >= context:
            raise ValueError(f"num_virtual_tokens ({config.num_virtual_tokens}) of adapter {name!r} must be below "
                             f"the model's context (max_position_embeddings={context})")
        forward = inspect.signature(model.get_base_model().forward).parameters
        if config.peft_type == PeftType.PREFIX_TUNING and "past_key_values" not in forward:
            raise ValueError(f"prefix tuning (adapter {name!r}) needs a model whose forward takes past_key_values; "
                             f"{type(model.get_base_model()).__name__}.forward does not (use prompt tuning instead)")
        reason = _prefix_reason(model, config) if config.peft_type == PeftType.PREFIX_TUNING else None
        if reason:
            report.unfused[f"adapter {name}"] = reason + " keeps peft's forward"
    swap_class(model, _prompt_forward, "fastft's prompt-learning checks and broadcast prefix")
    report.fused["prompt learning (peft)"] += 1
