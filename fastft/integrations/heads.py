"""What weight an output head (lm_head) effectively applies, whatever library built it: nn.Linear, fastft's
NF4Linear, bitsandbytes' Linear4bit, a peft LoRA layer around one of those. The fused losses take the head's weight
instead of running the head."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fastft.nn import NF4Linear


def gather_sharded_head(head: nn.Module) -> None:
    """FSDP2: all-gather the parameters of a head that `fully_shard` wrapped apart from the model's root (its own
    forward never runs when a fused loss reads its weight, so FSDP's pre-forward unshard never fires). The
    unsharded parameters then take the loss's gradients, which the root's post-backward callback reduce-scatters
    and reshards like those of any module that ran. A no-op for unsharded heads and for heads in the root's group
    (already gathered by the root's forward, which does not reshard after it)."""
    if not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    for module in head.modules():
        if isinstance(module, FSDPModule):
            module.unshard()
    sharded = [name for name, param in head.named_parameters() if isinstance(param, DTensor)]
    if sharded:
        raise ValueError(f"the output head's parameters {sharded} are sharded (FSDP2) by a module whose forward is "
                         "not running: read the head inside that module's forward, or call its unshard() first")


def head_weight(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) an output head effectively applies: nn.Linear as is; NF4Linear and bitsandbytes 4-bit
    dequantized; a peft LoRA head merged as W + sum(scale * B @ A) (differentiable in A and B, so LoRA on lm_head
    trains through the fused loss). Under FSDP2 the head is gathered first (gather_sharded_head)."""
    from peft.tuners.lora import LoraLayer

    gather_sharded_head(head)

    if isinstance(head, LoraLayer):
        weight, bias = head_weight(head.get_base_layer())
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
        return nf4.dequantize(head.weight.data, state), head.bias
    if isinstance(head, nn.Linear):
        return head.weight, head.bias
    raise TypeError(f"no known weight for an output head of type {type(head).__name__}")
