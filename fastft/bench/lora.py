"""LoRA benchmarks: a peft LoRA model patched by fastft vs the same peft model unpatched (and over a
bitsandbytes 4-bit base), on the same inputs in this process."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fastft
from fastft.bench.harness import Machine, Row, compare_ms, saved_for_backward_bytes


class _OneLayer(nn.Module):
    def __init__(self, layer: nn.Module):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def _four_bit(linear: nn.Linear) -> nn.Module:
    import bitsandbytes as bnb

    layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                              compute_dtype=torch.float32, compress_statistics=True, quant_type="nf4")
    layer.load_state_dict(linear.state_dict())
    return layer.to("cpu")


def run_layer(machine: Machine, tokens: int = 2048, size: int = 4096, rank: int = 16, repeats: int = 5,
              progress=print) -> list[Row]:
    """One projection (tokens x size @ size x size, fp32), LoRA r=16, dropout 0.05, fwd+bwd."""
    from peft import LoraConfig, get_peft_model

    results = []
    torch.manual_seed(0)
    dense = nn.Linear(size, size, bias=False)
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["proj"])
    x = torch.randn(tokens, size, requires_grad=True)
    grad = torch.randn(tokens, size)
    flops = 2 * 2 * tokens * size * size  # base forward + dx; the rank-r terms are ~1% more
    for base_name, base in (("fp32", dense), ("NF4", _four_bit(dense))):
        progress(f"LoRA layer {tokens}x{size}, {base_name} base, fwd+bwd")
        peft_model = get_peft_model(_OneLayer(base), config)
        patched = copy.deepcopy(peft_model)
        fastft.patch(patched)
        ms = compare_ms({"fastft": lambda: patched(x).backward(grad), "peft": lambda: peft_model(x).backward(grad)},
                        repeats=repeats)
        saved = {name: saved_for_backward_bytes(lambda: model(x), exclude=list(model.parameters()))
                 for name, model in (("fastft", patched), ("peft", peft_model))}
        peer = "peft" if base_name == "fp32" else "peft + bitsandbytes"
        target = ">= 1.25x peft, <= 0.35x its saved bytes" if base_name == "fp32" else ">= 1.5x peft + bnb"
        results.append(Row(f"LoRA r={rank} layer, {base_name} base, fwd+bwd", ms["fastft"], peer, ms["peft"],
                           machine.gemm_ms(flops), target, fastft_saved_bytes=saved["fastft"],
                           peer_saved_bytes=saved["peft"]))
        if base_name == "fp32":
            results[-1].met = results[-1].speedup >= 1.25 and saved["fastft"] <= 0.35 * saved["peft"]
        else:
            results[-1].met = results[-1].speedup >= 1.5
    return results
