"""What weight an output head (lm_head) effectively applies, whatever library built it: nn.Linear, fastft's
NF4Linear, bitsandbytes' Linear4bit, a peft LoRA layer around one of those. The fused losses take the head's weight
instead of running the head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastft.nn import NF4Linear


def gather_sharded_head(head: nn.Module) -> list[nn.Module]:
    """FSDP2: all-gather the parameters of a head that `fully_shard` wrapped apart from the model's root (its own
    forward never runs when a fused loss reads its weight, so FSDP's pre-forward unshard never fires). The
    unsharded parameters then take the loss's gradients, which the root's post-backward callback reduce-scatters
    and reshards like those of any module that ran. A no-op for unsharded heads and for heads in the root's group
    (already gathered by the root's forward, which does not reshard after it). Returns the FSDP2 modules this call
    gathered (those whose parameters were sharded: not those already gathered, e.g. for a backward to come)."""
    if not torch.distributed.is_available():
        return []
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    gathered = []
    for module in head.modules():
        if isinstance(module, FSDPModule):
            nested = {id(p) for sub in module.modules() if sub is not module and isinstance(sub, FSDPModule)
                      for p in sub.parameters()}
            if any(isinstance(p, DTensor) for p in module.parameters() if id(p) not in nested):
                gathered.append(module)
            module.unshard()
    sharded = [name for name, param in head.named_parameters() if isinstance(param, DTensor)]
    if sharded:
        raise ValueError(f"the output head's parameters {sharded} are sharded (FSDP2) by a module whose forward is "
                         "not running: read the head inside that module's forward, or call its unshard() first")
    return gathered


def gather_in_backward(head: nn.Module, *outputs: Tensor | None) -> None:
    """FSDP2: make the backward of `outputs` (computed from head_weight(head) with gradients enabled) gather the
    head again before it runs, as FSDP2 does for a module's own outputs. Autograd keeps the gathered parameters,
    and anything that reshards the head before that backward frees them: a forward of the head module itself
    (FSDP2 reshards a non-root module after its forward), or its reshard(). Gathering an unsharded head is a no-op.
    Nothing for heads that no FSDP2 module of their own shards, nor for outputs that need no gradient."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule

    modules = [module for module in head.modules() if isinstance(module, FSDPModule)]
    if not modules:
        return

    def gather(grad):
        for module in modules:
            module.unshard()

    for output in outputs:
        if output is not None and output.requires_grad:
            output.register_hook(gather)


def head_weight(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) an output head effectively applies: nn.Linear as is; NF4Linear and bitsandbytes 4-bit
    dequantized; a peft LoRA head merged as W + sum(scale * B @ A) (differentiable in A and B, so LoRA on lm_head
    trains through the fused loss). Under FSDP2 the head is gathered first (gather_sharded_head). Gathered with
    gradients disabled (a reference or old-policy pass, eval, a teacher), no backward will reshard it: the head is
    resharded before returning, so its memory is back to the shard's once the caller drops the returned tensors
    (those that are its gathered parameters themselves, a plain head's weight and a bias, are returned as copies)."""
    gathered = gather_sharded_head(head)
    weight, bias = _applied_weight(head)
    if gathered and not torch.is_grad_enabled():
        params = [id(param) for param in head.parameters()]
        weight, bias = (t.clone() if id(t) in params else t for t in (weight, bias))
        for module in gathered:
            module.reshard()
    return weight, bias


def _applied_weight(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    from peft.tuners.lora import LoraLayer

    if isinstance(head, LoraLayer):
        weight, bias = _applied_weight(head.get_base_layer())
        if not head.disable_adapters and not head.merged:
            for name in head.active_adapters:
                if name in head.lora_A:
                    delta = head.lora_B[name].weight @ head.lora_A[name].weight * float(head.scaling[name])
                    weight = weight + (delta.t() if getattr(head, "fan_in_fan_out", False) else delta).to(weight.dtype)
        return weight, bias
    if isinstance(head, NF4Linear):
        return head.to_linear().weight.detach(), head.bias
    if type(head).__name__ == "Linear4bit":
        from fastft import nf4
        from fastft.integrations.bnb import nf4_state

        state = nf4_state(head)  # first: it may convert the weight back to bitsandbytes' standard layout
        return nf4.dequantize(nf4.packed_bytes(head.weight.data), state), head.bias  # any quant_storage
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise TypeError(f"no known weight for an output head of type {type(head).__name__}")
