"""What weight an output head (lm_head) effectively applies, whatever library built it: nn.Linear, fastft's
NF4Linear, bitsandbytes' Linear4bit, a peft LoRA layer around one of those. The fused losses take the head's weight
instead of running the head."""

from __future__ import annotations

from torch import Tensor, nn

from fastft.nn import NF4Linear


def head_weight(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) an output head effectively applies: nn.Linear as is; NF4Linear and bitsandbytes 4-bit
    dequantized; a peft LoRA head merged as W + sum(scale * B @ A) (differentiable in A and B, so LoRA on lm_head
    trains through the fused loss)."""
    from peft.tuners.lora import LoraLayer

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
