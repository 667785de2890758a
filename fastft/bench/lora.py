"""LoRA benchmarks: a peft LoRA model patched by fastft vs the same peft model unpatched (and over a
bitsandbytes 4-bit base), on the same inputs in this process."""

from __future__ import annotations

import copy

import torch
from torch import nn

import fastft
from fastft.bench.harness import Machine, Row, compare_ms, saved_for_backward_bytes
from fastft.nn import NF4Linear


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


def _patched_vs_peft(peft_model: nn.Module, x: torch.Tensor, grads, repeats: int,
                     floor: nn.Module | None = None) -> tuple[dict, dict]:
    """(ms, bytes saved for backward) of fwd+bwd through a fastft-patched copy of `peft_model` and through
    `peft_model` itself, on x with the output gradient(s) `grads`, timed side by side (with `floor`, a module
    without LoRA, timed in the same rounds under the name "floor")."""
    patched = copy.deepcopy(peft_model)
    fastft.patch(patched)
    models = {"fastft": patched, "peft": peft_model}
    timed = {**models, "floor": floor} if floor is not None else models
    ms = compare_ms({name: (lambda m=model: torch.autograd.backward(m(x), grads)) for name, model in timed.items()},
                    repeats=repeats)
    saved = {name: saved_for_backward_bytes(lambda m=model: m(x), exclude=list(model.parameters()))
             for name, model in models.items()}
    return ms, saved


def run_layer(machine: Machine, tokens: int = 2048, size: int = 4096, rank: int = 16, repeats: int = 5,
              progress=print) -> list[Row]:
    """One projection (tokens x size @ size x size, fp32), LoRA r=16, dropout 0.05, fwd+bwd; and the floor of any
    LoRA implementation on that layer: the base projection alone (fp32 nn.Linear, or fastft's NF4 matmul on the same
    bitsandbytes storage), timed in the same rounds."""
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
        floor = copy.deepcopy(peft_model.base_model.model.proj.base_layer)
        if base_name == "NF4":
            floor = NF4Linear.from_bnb(floor)
        ms, saved = _patched_vs_peft(peft_model, x, grad, repeats, floor=floor)
        peer = "peft" if base_name == "fp32" else "peft + bitsandbytes"
        target = ">= 1.25x peft, <= 0.35x its saved bytes" if base_name == "fp32" else ">= 1.5x peft + bnb"
        results.append(Row(f"LoRA r={rank} layer, {base_name} base, fwd+bwd", ms["fastft"], peer, ms["peft"],
                           machine.gemm_ms(flops), target, fastft_saved_bytes=saved["fastft"],
                           peer_saved_bytes=saved["peft"]))
        if base_name == "fp32":
            results[-1].met = results[-1].speedup >= 1.25 and saved["fastft"] <= 0.35 * saved["peft"]
        else:
            results[-1].met = results[-1].speedup >= 1.5
        # peer / floor: the most any LoRA implementation of this layer can gain over the peer on this machine
        results.append(Row(f"{base_name} base alone, no LoRA (the floor), fwd+bwd", ms["floor"], peer, ms["peft"],
                           machine.gemm_ms(flops)))
    return results


def run_group(machine: Machine, tokens: int = 2048, hidden: int = 1024, rank: int = 16, repeats: int = 5,
              progress=print) -> list[Row]:
    """The q/k/v projections of the mini Llama's attention (tokens x hidden, three hidden x hidden bases, LoRA r=16,
    dropout 0.05) reading one x, fwd+bwd: fastft's input group (one call for the three LoRA terms, x saved once)
    vs peft (three dropouts, each saving a mask and the dropped x)."""
    from peft import LoraConfig, get_peft_model

    progress(f"LoRA q/k/v group {tokens}x{hidden}, r={rank}, fwd+bwd")
    torch.manual_seed(0)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj = (nn.Linear(hidden, hidden, bias=False) for _ in range(3))

        def forward(self, x):
            return self.q_proj(x), self.k_proj(x), self.v_proj(x)

    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj"])
    x = torch.randn(tokens, hidden, requires_grad=True)
    grads = [torch.randn(tokens, hidden) for _ in range(3)]
    ms, saved = _patched_vs_peft(get_peft_model(Attention(), config), x, grads, repeats)
    flops = 3 * 2 * 2 * tokens * hidden * hidden
    return [Row(f"LoRA r={rank} q/k/v group {tokens}x{hidden}, fp32 bases, fwd+bwd", ms["fastft"], "peft",
                ms["peft"], machine.gemm_ms(flops), fastft_saved_bytes=saved["fastft"], peer_saved_bytes=saved["peft"])]


def run_dora(machine: Machine, tokens: int = 2048, size: int = 4096, rank: int = 16, repeats: int = 3,
             progress=print) -> list[Row]:
    """One DoRA projection (tokens x size @ size x size, fp32, r=16), fwd+bwd, dropout 0 and 0.05: fastft's fused
    DoRA (norm without the size x size product, one scaled sum) vs peft's DoRA forward."""
    from peft import LoraConfig, get_peft_model

    rows = []
    x = torch.randn(tokens, size, requires_grad=True)
    grad = torch.randn(tokens, size)
    for dropout in (0.0, 0.05):
        progress(f"DoRA r={rank} layer {tokens}x{size}, dropout {dropout}, fwd+bwd")
        torch.manual_seed(0)
        config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=dropout, target_modules=["proj"], use_dora=True)
        ms, saved = _patched_vs_peft(get_peft_model(_OneLayer(nn.Linear(size, size, bias=False)), config), x, grad,
                                     repeats)
        rows.append(Row(f"DoRA r={rank} layer, fp32 base, dropout {dropout}, fwd+bwd", ms["fastft"], "peft DoRA",
                        ms["peft"], machine.gemm_ms(2 * 2 * tokens * size * size), fastft_saved_bytes=saved["fastft"],
                        peer_saved_bytes=saved["peft"]))
    return rows
