"""`fastft.patch(model)` for peft LoRA models: swaps the class of peft's `lora.Linear` / `lora.Linear4bit`
instances for fastft subclasses whose forward runs the fused LoRA op (and, for 4-bit bases, fastft's fused
NF4 matmul on bitsandbytes' own storage). No parameter or buffer is added, so peft's save/merge/adapter
machinery works unchanged; whatever the fused path does not cover runs peft's own forward.

Sibling projections that read one input (q/k/v of an attention block, gate/up of an MLP) form an input group: the
first member called computes the rank-r products of every member in one fastft::lora_down call (x read once, one
rank-r GEMM without dropout) and hands each sibling its products when the sibling is called with that same tensor;
each member adds its up-projections into its base output in place (one GEMM pass over it, no temporary).
A group whose members turn out to read different inputs (cross-attention, cached keys) stops grouping, and the
patch report says so. The products waiting for siblings are kept per thread: threads running forwards of one model
each group their own calls.

A patched model pickles (torch.save, copy.deepcopy) into a patched model: see fastft/integrations/class_swap.py.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field

import torch
from peft.tuners.lora import layer as peft_lora
from torch import nn

from fastft import nf4
from fastft.integrations.class_swap import original_class, restore_classes, swap_class
from fastft.integrations.peft_nf4 import LoraNF4Linear
from fastft.ops import lora as lora_ops

_VARIANT_KWARGS = tuple(getattr(peft_lora, "VARIANT_KWARG_KEYS", ()))  # keyword arguments of LoRA variants (aLoRA)


@dataclass
class PatchReport:
    """What `patch` fused (counts by kind) and which LoRA modules stay on peft's path, with the reason."""

    fused: Counter = field(default_factory=Counter)
    unfused: dict[str, str] = field(default_factory=dict)
    input_groups: dict[str, str] = field(default_factory=dict)  # group -> "grouped", or why it stopped

    def __str__(self) -> str:
        lines = [f"fastft.patch: fused {sum(self.fused.values())} module(s)"]
        lines += [f"  {kind}: {count}" for kind, count in sorted(self.fused.items())]
        if self.input_groups:
            lines.append(f"LoRA input groups (one call for the siblings' rank-r terms): {len(self.input_groups)}")
            lines += [f"  {name}: {state}" for name, state in sorted(self.input_groups.items())]
        if self.unfused:
            lines.append(f"left on peft's forward: {len(self.unfused)}")
            lines += [f"  {name}: {reason}" for name, reason in sorted(self.unfused.items())]
        return "\n".join(lines)


def _new_seed() -> int:
    # Drawn from torch's CPU generator: torch.manual_seed makes runs reproducible, and activation
    # checkpointing (which restores the RNG state) replays the same dropout masks.
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))


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
    active = [name for name in layer.active_adapters if name in layer.lora_A]
    if (len(active) != 1 or not _is_dora(layer, active[0]) or layer.disable_adapters or layer.merged
            or kwargs.get("adapter_names") is not None or any(kwargs.get(k) is not None for k in _VARIANT_KWARGS)):
        return None
    return active[0]


def _dora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """Row norms of weight + scale * B @ A (out, in) without forming it: |W_i|^2 + 2 s B_i (W A^T)_i^T +
    s^2 B_i (A A^T) B_i^T, accumulated in fp32: W is read twice (its row norms, one rank-r GEMM) and no out x in
    tensor is allocated."""
    a, b = lora_A.float(), lora_B.float()
    squared = torch.linalg.vector_norm(weight, dim=1, dtype=torch.float32).square_()
    squared += 2 * scale * (b * (weight @ lora_A.t().to(weight.dtype)).float()).sum(1)
    squared += scale**2 * ((b @ (a @ a.t())) * b).sum(1)
    return squared.clamp_(min=0).sqrt_()


def _dora_forward(layer, x: torch.Tensor, name: str) -> torch.Tensor:
    """peft's DoRA output for one adapter: base(x) + (g - 1) W drop(x) + g s B A drop(x), g = m / |W + s B A|_row
    (the norm detached, as in peft), computed as g * (W drop(x) + s B A drop(x)) (+ base(x) - W drop(x) with
    dropout): one base GEMM without dropout, no out x in matrix for the norm, the LoRA term from fastft's op."""
    from peft.utils.other import transpose

    base = layer.get_base_layer()
    lora_A, lora_B = layer.lora_A[name].weight, layer.lora_B[name].weight
    scale = float(layer.scaling[name])
    result_dtype = x.dtype
    x = layer._cast_input_dtype(x, lora_A.dtype)
    weight = transpose(base.weight, layer.fan_in_fan_out).to(x.dtype)
    with torch.no_grad():
        norm = _dora_weight_norm(weight, lora_A, lora_B, scale).to(x.dtype)
    gain = (layer.lora_magnitude_vector[name].weight / norm).view(1, -1)
    dropout = layer.lora_dropout[name]
    dropped = x if isinstance(dropout, nn.Identity) or not layer.training else dropout(x)
    product = torch.nn.functional.linear(dropped, weight)
    delta, _ = lora_ops.lora_delta(dropped, lora_A, lora_B, scale, 0.0, 0, None)
    scaled = (product + delta.to(product.dtype)) * gain
    if dropped is x:
        out = scaled if base.bias is None else scaled + base.bias
    else:
        out = layer.base_layer(x) - product + scaled
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


def _lora_products(x: torch.Tensor, terms: list[tuple]) -> list[torch.Tensor]:
    """The rank-r product u_g of each (lora_A, lora_B, scale, p, bias): one fastft::lora_down call per (A dtype, p)."""
    products: list = [None] * len(terms)
    calls: dict[tuple, list[int]] = {}
    for index, (lora_A, _, _, p, _) in enumerate(terms):
        calls.setdefault((lora_A.dtype, p), []).append(index)
    for (_, p), indices in calls.items():
        As = [terms[i][0] for i in indices]
        # Without dropout the seeds are unused: none is drawn, so torch's random stream advances as with peft (whose
        # dropout is then an nn.Identity) and torch.compile has no host sync to break its graph on.
        u = lora_ops.lora_down(x, As, p, [_new_seed() if p > 0 else 0 for _ in indices])
        for i, u_g in zip(indices, u.split([A.shape[0] for A in As], dim=1)):
            products[i] = u_g
    return products


class _PendingProducts(threading.local):
    """One thread's round of an input group: the x its first member was called with (and x's version then), and
    the rank-r products of the members that have not taken theirs yet."""

    def __init__(self):
        self.x: torch.Tensor | None = None
        self.version = -1
        self.pending: dict[int, list] = {}  # id(member) -> its rank-r products, for x


class _InputGroup:
    """Sibling LoRA layers reading one input. The first member called with x computes every eligible member's
    terms; the others take theirs when called with the same, unmodified x (same object, same version). A round is
    per thread, so forwards of one model running in several threads each group their own calls; a copy of the group
    (pickle, deepcopy) starts with no round in progress."""

    def __init__(self, name: str, members: list, report: PatchReport):
        self.name, self.members, self.report = name, members, report
        self.active = True
        self._round = _PendingProducts()

    @property
    def x(self) -> torch.Tensor | None:
        return self._round.x

    @property
    def pending(self) -> dict[int, list]:
        return self._round.pending

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_round"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._round = _PendingProducts()

    def take(self, layer, x: torch.Tensor) -> list[torch.Tensor] | None:
        """layer's rank-r products for x, or None where the group does not serve this call (then layer computes
        its own): under torch.compile, once the group stopped, and for a module that is none of the members (a
        copy of one, e.g. nn.DataParallel's replicas, which share the group object)."""
        if torch.compiler.is_compiling() or not any(m is layer for m in self.members):
            return None
        current = self._round
        if not self.active:
            if current.pending:  # the group stopped during this thread's round: release x
                current.x, current.version, current.pending = None, -1, {}
            return None
        if x is current.x and x._version == current.version and id(layer) in current.pending:
            mine = current.pending.pop(id(layer))
            if not current.pending:  # every member took its own: release x
                current.x, current.version = None, -1
            return mine
        if current.pending:  # a member left its term unused, or was called with another input: stop grouping
            self.active = False
            current.x, current.version, current.pending = None, -1, {}
            self.report.input_groups[self.name] = "stopped: the members read different inputs (each runs alone)"
            return None
        members = [m for m in self.members if m is layer or _runs_fused(m, {})]
        terms = [_adapter_terms(m, m.training) for m in members]
        for member, member_terms in zip(members, terms):
            _check_cast(member, x, member_terms)
        flat = _lora_products(x, [term for member_terms in terms for term in member_terms])
        start = 0
        for member, member_terms in zip(members, terms):
            if member is not layer:
                current.pending[id(member)] = flat[start:start + len(member_terms)]
            else:
                mine = flat[start:start + len(member_terms)]
            start += len(member_terms)
        if current.pending:
            current.x, current.version = x, x._version
        return mine


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
            group = _InputGroup(group_name, list(members.values()), report)
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
    """result + every active adapter's term. in_place (the base output is private, computed on x's rows): the
    up-projections accumulate into result (addmm_: one pass over it, no (tokens, out) temporary) when it is a 2-D
    tensor of their dtype (peft's out-of-place sum would otherwise promote) and not a view (autograd forbids in-place
    changes of views made inside custom ops, and a view's in-place change costs a copy of its gradient). Under
    torch.compile the sum stays out of place (the compiler fuses it)."""
    terms = _adapter_terms(layer, layer.training)
    group = layer.__dict__.get("_fastft_input_group")
    products = group.take(layer, x) if group is not None else None
    if products is None:
        _check_cast(layer, x, terms)
        products = _lora_products(x, terms)
    if (in_place and not torch.compiler.is_compiling() and result.dim() == 2 and result.is_contiguous()
            and not result._is_view() and all(lora_B.dtype == result.dtype for _, lora_B, *_ in terms)):
        for (_, lora_B, scale, _, bias), u_g in zip(terms, products):
            lora_ops.add_lora_up(result, u_g, lora_B, scale, bias)
        return result
    for (_, lora_B, scale, _, bias), u_g in zip(terms, products):
        delta = lora_ops.lora_up(u_g, lora_B, scale, bias).view(*result.shape[:-1], lora_B.shape[0])
        result = result + (delta.to(result.dtype) if cast_result_per_adapter else delta)
    return result


def _lora_linear_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
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


def _linear4bit_base(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """bitsandbytes Linear4bit.forward with the fused NF4 matmul on its own storage (no dequantized copy)."""
    if not base.compute_type_is_set:
        base.set_compute_type(x)
        base.compute_type_is_set = True
    input_dtype = x.dtype
    if base.compute_dtype is not None:
        x = x.to(base.compute_dtype)
    bias = None if base.bias is None else base.bias.to(x.dtype)
    state = _nf4_state(base)  # first: it may convert base.weight back to the standard layout
    return nf4.matmul(x, base.weight.data, state, bias).to(input_dtype)


def _nf4_state(base: nn.Module) -> nf4.NF4State:
    """The NF4State view of a bitsandbytes layer's QuantState, built once per QuantState (reading the
    double-quant offset is a host sync on GPU) and kept outside the module's parameters and buffers. A weight that
    bitsandbytes repacked for its CPU kernel (its own forward does so in eval mode without gradients on
    AVX512_BF16 CPUs, e.g. when an unfused call ran) is converted back to its standard layout first."""
    quant_state = base.weight.quant_state
    cached = base.__dict__.get("_fastft_nf4_state")
    if cached is None or cached[0] is not quant_state or getattr(quant_state, "packing_format_for_cpu", False):
        _, state = nf4.NF4State.from_bnb_weight(base.weight)
        cached = (base.weight.quant_state, state)
        base.__dict__["_fastft_nf4_state"] = cached
    return cached[1]


def _keep_bnb_standard_layout(base: nn.Module) -> None:
    """Convert a bitsandbytes Linear4bit's weight back to the standard layout if bitsandbytes repacked it for its
    CPU kernel, and keep its own forward (still run by unfused calls, e.g. with adapters disabled) from repacking
    it again: the fused path reads the standard layout, and converting back and forth would cost a pass over the
    weight each time (and requantize double-quant statistics). `unpatch` gives bitsandbytes its setting back."""
    _nf4_state(base)
    if "support_avx512bf16_for_cpu" in base.__dict__ and "_fastft_bnb_cpu_repack" not in base.__dict__:
        base.__dict__["_fastft_bnb_cpu_repack"] = base.support_avx512bf16_for_cpu
        base.support_avx512bf16_for_cpu = False


def _lora_linear4bit_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    base = self.get_base_layer()
    if not _runs_fused(self, kwargs) or args or kwargs or torch.is_autocast_enabled():
        return original_class(self).forward(self, x, *args, **kwargs)
    self._check_forward_args(x)
    result = _linear4bit_base(base, x.reshape(-1, x.shape[-1]))  # bitsandbytes' forward; it runs no hooks
    result = _add_lora(self, x, result, cast_result_per_adapter=True, in_place=True)
    return result.reshape(*x.shape[:-1], result.shape[-1])


def _bnb_linear4bit_lora_class():
    try:
        from peft.tuners.lora.bnb import Linear4bit
    except ImportError:
        return None
    return Linear4bit


def _plain_bnb_4bit_layers(model: nn.Module):
    """(parent, child name, full name, module) of bitsandbytes Linear4bit layers not wrapped by a LoRA layer."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if type(child) is bnb.nn.Linear4bit and not isinstance(module, peft_lora.LoraLayer):
                yield module, child_name, f"{name}.{child_name}" if name else child_name, child


def patch(model: nn.Module, *, lora: bool = True, nf4: bool = True, qat: bool = True,
          fused_loss: bool = False) -> PatchReport:
    """Fuse the LoRA layers of `model` (a PeftModel, or a transformers model with adapters) in place, (nf4=True)
    run bitsandbytes 4-bit layers through fastft's fused NF4 matmul on their own storage, (qat=True) run the
    fake quantization of a torchao-prepared model's FakeQuantizedLinears on fastft's kernels, and (fused_loss=True)
    compute a causal LM's training loss from its hidden states without materializing the logits (outputs.logits is
    then None in training with labels: off by default, since scripts may read the logits; see
    fastft/integrations/causal_lm.py).

    Per instance and reversible (`unpatch`): other models and torch.nn.functional are untouched.
    """
    from fastft.nn import NF4Linear

    report = PatchReport()
    peft_4bit = _bnb_linear4bit_lora_class()
    if nf4:
        for parent, child_name, full_name, layer in list(_plain_bnb_4bit_layers(model)):
            try:
                fused = NF4Linear.from_bnb(layer)
            except (TypeError, ValueError) as error:
                report.unfused[full_name] = str(error)
                continue
            fused.__dict__["_fastft_replaced"] = layer  # not a submodule: keeps state_dict keys unchanged
            setattr(parent, child_name, fused)
            report.fused["bnb.Linear4bit -> NF4Linear"] += 1
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
            if module.get_base_layer().weight.data.dtype != torch.uint8:
                report.unfused[name] = "4-bit weight stored in a dtype other than uint8"
                continue
        else:
            report.unfused[name] = f"{type(module).__name__} has no fused path"
            continue
        reason = _static_reason(module)
        if reason is not None:
            report.unfused[name] = reason
            continue
        report.fused[f"lora.{type(module).__name__}"] += 1
        if forward is _lora_linear4bit_forward:
            _keep_bnb_standard_layout(module.get_base_layer())
        swap_class(module, forward, "fastft's fused LoRA op")
    if lora:
        _form_input_groups(model, report)
    if qat:
        from fastft.integrations.qat import patch_torchao

        patch_torchao(model, report)
    if fused_loss:
        from fastft.integrations.causal_lm import patch_causal_lm_loss

        patch_causal_lm_loss(model, report)
    return report


def unpatch(model: nn.Module) -> int:
    """Undo `patch` on `model`: peft's, bitsandbytes', torchao's and the causal LM's modules come back; returns how
    many."""
    for module in model.modules():
        module.__dict__.pop("_fastft_input_group", None)
        if "_fastft_bnb_cpu_repack" in module.__dict__:
            module.support_avx512bf16_for_cpu = module.__dict__.pop("_fastft_bnb_cpu_repack")
    restored = restore_classes(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            replaced = child.__dict__.get("_fastft_replaced")
            if replaced is not None:
                setattr(module, child_name, replaced)
                restored += 1
    return restored
