"""`fastft.patch(model)` for peft LoRA models: swaps the class of peft's `lora.Linear` / `lora.Linear4bit`
instances for fastft subclasses whose forward runs the fused LoRA pieces of fastft/nn/lora.py on peft's own
parameters (and, for 4-bit bases, fastft's fused NF4 matmul on bitsandbytes' own storage: fastft/integrations/bnb.py).
No parameter or buffer is added, so peft's save/merge/adapter machinery works unchanged; whatever the fused path does
not cover runs peft's own forward.

Sibling projections that read one input (q/k/v of an attention block, gate/up of an MLP) form an input group
(fastft.nn.lora.InputGroup): the first member called computes the rank-r products of every member in one
fastft::lora_down call and hands each sibling its products when the sibling is called with that same tensor; each
member adds its up-projections into its base output in place. A group whose members turn out to read different
inputs (cross-attention, cached keys) stops grouping, and the patch report says so.

A patched model pickles (torch.save, copy.deepcopy) into a patched model: see fastft/integrations/class_swap.py.
"""

from __future__ import annotations

import torch
from peft.tuners.lora import layer as peft_lora
from torch import nn

from fastft.integrations import bnb, peft_decode
from fastft.integrations.class_swap import original_class, restore_classes, swap_class
from fastft.integrations.peft_nf4 import LoraNF4Linear
from fastft.integrations.report import PatchReport
from fastft.nn.lora import InputGroup, add_lora_terms, dora_output, lora_products
from fastft.nn.lora import dora_weight_norm as _dora_weight_norm  # noqa: F401  (its former home)
from fastft.ops import lora as lora_ops  # noqa: F401  (the ops the fused forward runs)

_VARIANT_KWARGS = tuple(getattr(peft_lora, "VARIANT_KWARG_KEYS", ()))  # keyword arguments of LoRA variants (aLoRA)


def _dropout_p(module: nn.Module, training: bool) -> float:
    return float(module.p) if isinstance(module, nn.Dropout) and training else 0.0


def _is_dora(layer, name: str) -> bool:
    return type(getattr(layer, "lora_variant", {}).get(name)).__name__ == "DoraLinearVariant"


def _dense_base(layer) -> bool:
    """Whether the base layer is x @ weight(^T) + bias with a dense float weight (nn.Linear, transformers Conv1D)."""
    base = layer.get_base_layer()
    return type(base) is nn.Linear or type(base).__name__ == "Conv1D"


def _static_reason(layer) -> str | None:
    """Why this LoRA layer can never take the fused path, or None."""
    for name in layer.lora_A:
        if _is_dora(layer, name) and not (type(layer) is peft_lora.Linear and _dense_base(layer)):
            return f"adapter '{name}' uses DoRA on a {type(layer.get_base_layer()).__name__} base (fused: dense bases)"
        if name in getattr(layer, "lora_variant", {}) and not _is_dora(layer, name):
            return f"adapter '{name}' uses a LoRA variant ({type(layer.lora_variant[name]).__name__})"
        if not isinstance(layer.lora_dropout[name], (nn.Dropout, nn.Identity)):
            return f"adapter '{name}' has dropout {type(layer.lora_dropout[name]).__name__}"
        if type(layer.lora_A[name]) is not nn.Linear or type(layer.lora_B[name]) is not nn.Linear:
            return f"adapter '{name}' has non-Linear lora_A/lora_B"
    return None


def _runs_fused(layer, kwargs) -> bool:
    """Call-time conditions of peft's plain path: adapters on, unmerged, no mixed batch, no variant kwargs."""
    variants = getattr(layer, "lora_variant", {})
    return (not layer.disable_adapters and not layer.merged and kwargs.get("adapter_names") is None
            and all(kwargs.get(k) is None for k in _VARIANT_KWARGS)
            and not any(name in variants for name in layer.active_adapters))


def _single_dora_adapter(layer, kwargs) -> str | None:
    """The active adapter when it is the only one and uses DoRA (with the plain path's other conditions), else None."""
    if not getattr(layer, "lora_variant", None):  # no variant at all (the common case): nothing more to look at
        return None
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if (len(active) != 1 or not _is_dora(layer, active[0]) or layer.disable_adapters or layer.merged
            or kwargs.get("adapter_names") is not None or any(kwargs.get(k) is not None for k in _VARIANT_KWARGS)):
        return None
    return active[0]


def _dora_forward(layer, x: torch.Tensor, name: str) -> torch.Tensor:
    """peft's DoRA output for one adapter (fastft.nn.lora.dora_output) from the layer's parameters."""
    from peft.utils.other import transpose

    base = layer.get_base_layer()
    result_dtype = x.dtype
    lora_A = layer.lora_A[name].weight
    x = layer._cast_input_dtype(x, lora_A.dtype)
    weight = transpose(base.weight, layer.fan_in_fan_out).to(x.dtype)
    dropout = layer.lora_dropout[name]
    dropped = x if isinstance(dropout, nn.Identity) or not layer.training else dropout(x)
    out = dora_output(x, dropped, weight, base.bias, lora_A, layer.lora_B[name].weight, float(layer.scaling[name]),
                      layer.lora_magnitude_vector[name].weight, layer.base_layer)
    return out.to(result_dtype)


def _adapter_terms(layer, training: bool) -> list[tuple]:
    """(lora_A, lora_B, scale, dropout p, lora bias) of each active adapter of `layer`, in peft's order."""
    terms = []
    for name in layer.active_adapters:
        if name in layer.lora_A:
            lora_B = layer.lora_B[name]
            terms.append((layer.lora_A[name].weight, lora_B.weight, float(layer.scaling[name]),
                          _dropout_p(layer.lora_dropout[name], training), lora_B.bias))
    return terms


def _check_cast(layer, x: torch.Tensor, terms: list[tuple]) -> None:
    if not getattr(layer, "cast_input_dtype_enabled", True):
        for lora_A, *_ in terms:
            if x.dtype != lora_A.dtype:
                raise TypeError(f"input dtype casting is disabled but x is {x.dtype} and lora_A is {lora_A.dtype}")


def _group_terms(member, x: torch.Tensor, caller: bool) -> list[tuple] | None:
    """An input group member's terms for x (None: a sibling that does not take the fused path now)."""
    if not caller and not _runs_fused(member, {}):
        return None
    terms = _adapter_terms(member, member.training)
    _check_cast(member, x, terms)
    return terms


# Sibling projections that read the same input in transformers models.
_INPUT_GROUP_NAMES = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"), ("query", "key", "value"),
                      ("w1", "w3"))


def _form_input_groups(model: nn.Module, report: PatchReport) -> None:
    for parent_name, parent in model.named_modules():
        for names in _INPUT_GROUP_NAMES:
            members = {n: getattr(parent, n, None) for n in names}
            members = {n: m for n, m in members.items() if isinstance(m, peft_lora.LoraLayer)
                       and original_class(m) is not None and not getattr(m, "lora_variant", {})}
            if len(members) < 2 or len({m.in_features for m in members.values()}) > 1:
                continue
            group_name = f"{parent_name}.({', '.join(members)})" if parent_name else f"({', '.join(members)})"
            group = InputGroup(group_name, list(members.values()), report)
            for member in members.values():
                member.__dict__["_fastft_input_group"] = group
            report.input_groups[group_name] = "grouped"


def _base_output_is_private(layer) -> bool:
    """No hook can see (and hold) the base layer's input, output or their gradients: the base may then be called on
    x's rows and take the LoRA terms into its output in place."""
    base, module = layer.base_layer, nn.modules.module
    return not (base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
                or module._global_forward_hooks or module._global_forward_pre_hooks
                or module._global_backward_hooks or module._global_backward_pre_hooks)


def _add_lora(layer, x, result, cast_result_per_adapter: bool, in_place: bool):
    """result + every active adapter's term (fastft.nn.lora.add_lora_terms), the rank-r products from the layer's
    input group when it has one."""
    terms = _adapter_terms(layer, layer.training)
    group = layer.__dict__.get("_fastft_input_group")
    products = group.take(layer, x, _group_terms) if group is not None else None
    if products is None:
        _check_cast(layer, x, terms)
        products = lora_products(x, terms)
    return add_lora_terms(result, terms, products, cast_result_per_adapter, in_place)


def _lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not args and not kwargs:
        out = peft_decode.dense_forward(self, x)  # a decode step's few rows under no grad, else None
        if out is not None:
            return out
    dora = _single_dora_adapter(self, kwargs) if not args and not kwargs else None
    if dora is not None:
        self._check_forward_args(x)
        return _dora_forward(self, x, dora)
    if not _runs_fused(self, kwargs):
        return original_class(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x, *args, **kwargs)
    for key in ("adapter_names", *_VARIANT_KWARGS):
        kwargs.pop(key, None)
    private = _base_output_is_private(self) and not args and not kwargs
    result = self.base_layer(x.reshape(-1, x.shape[-1]) if private else x, *args, **kwargs)
    result_dtype = result.dtype
    result = _add_lora(self, x, result, cast_result_per_adapter=False, in_place=private)
    return result.reshape(*x.shape[:-1], result.shape[-1]).to(result_dtype)


def _lora_linear4bit_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    if not args and not kwargs:
        out = peft_decode.linear4bit_forward(self, x)  # a decode step's few rows under no grad, else None
        if out is not None:
            return out
    base = self.get_base_layer()
    if args or kwargs or torch.is_autocast_enabled():
        return original_class(self).forward(self, x, *args, **kwargs)
    if self.disable_adapters or self.merged:
        # peft runs the base layer alone here (adapters disabled: a DPO reference pass, GRPO's KL term, user code
        # under disable_adapter; or merged into the weight): on the fused NF4 matmul too
        self._check_forward_args(x)
        if self.disable_adapters and self.merged:
            self.unmerge()
        return bnb.linear4bit_forward(base, x)
    if not _runs_fused(self, kwargs):
        return original_class(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x)
    result = bnb.linear4bit_forward(base, x.reshape(-1, x.shape[-1]))  # bitsandbytes' forward; it runs no hooks
    result = _add_lora(self, x, result, cast_result_per_adapter=True, in_place=True)
    return result.reshape(*x.shape[:-1], result.shape[-1])


def _bnb_linear4bit_lora_class():
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def patch(model: nn.Module, *, lora: bool = True, nf4: bool = True, qat: bool = True,
          fused_loss: bool = False, prompt: bool = True) -> PatchReport:
    """Fuse the LoRA layers of `model` (a PeftModel, or a transformers model with adapters) in place, (nf4=True)
    run bitsandbytes 4-bit layers through fastft's fused NF4 matmul on their own storage, (qat=True) run the
    fake quantization of a torchao-prepared model's FakeQuantizedLinears on fastft's kernels, and (fused_loss=True)
    compute a causal LM's training loss from its hidden states without materializing the logits (outputs.logits is
    then None in training with labels: off by default, since scripts may read the logits; see
    fastft/integrations/causal_lm.py), and (prompt=True) run a prompt-learning PeftModelForCausalLM's virtual tokens
    through fastft/integrations/peft_prompt.py (length checks; prefix tuning's prefix once per step, gradient
    checkpointing).

    Per instance and reversible (`unpatch`): other models and torch.nn.functional are untouched.
    """
    report = PatchReport()
    peft_4bit = _bnb_linear4bit_lora_class()
    if nf4:
        bnb.replace_linear4bit(model, report, wrapper_types=(peft_lora.LoraLayer,))
    for name, module in model.named_modules():
        peft_class = original_class(module)
        if peft_class is not None and isinstance(module, peft_lora.LoraLayer):
            report.fused[f"lora.{peft_class.__name__}"] += 1
            continue
        if not lora or not isinstance(module, peft_lora.LoraLayer):
            continue
        if type(module) is peft_lora.Linear or type(module) is LoraNF4Linear:
            forward = _lora_linear_forward
        elif peft_4bit is not None and type(module) is peft_4bit and nf4:
            forward = _lora_linear4bit_forward
        else:
            report.unfused[name] = f"{type(module).__name__} has no fused path"
            continue
        reason = _static_reason(module)
        if reason is not None:
            report.unfused[name] = reason
            continue
        report.fused[f"lora.{type(module).__name__}"] += 1
        if forward is _lora_linear4bit_forward:
            bnb.keep_standard_layout(module.get_base_layer())
        swap_class(module, forward, "fastft's fused LoRA op")
    if lora:
        _form_input_groups(model, report)
    if qat:
        from fastft.integrations.qat import patch_torchao

        patch_torchao(model, report)
    if fused_loss:
        from fastft.integrations.causal_lm import patch_causal_lm_loss

        patch_causal_lm_loss(model, report)
    if prompt:
        from fastft.integrations.peft_prompt import patch_prompt_learning

        patch_prompt_learning(model, report)
    return report


def unpatch(model: nn.Module) -> int:
    """Undo `patch` on `model`: peft's, bitsandbytes', torchao's and the causal LM's modules come back; returns how
    many."""
    for module in model.modules():
        module.__dict__.pop("_fastft_input_group", None)
        bnb.restore_layout_setting(module)
    return restore_classes(model) + bnb.restore_linear4bit(model)
