"""Full and partial (frozen-layer) fine-tuning: `freeze` trains the top k decoder layers and/or the parameters whose
names match glob patterns, plus the head, and freezes the rest. Options for the frozen part:

- quantize=True holds its linear layers in 4-bit (fastft.quantize_model: NF4Linear, bitsandbytes' format), so a
  frozen 16/32-bit copy never exists;
- the frozen modules below the lowest trainable one (the input embeddings and the bottom layers) run under
  torch.no_grad, so autograd keeps no activation there even when something makes their input require grad
  (transformers' `enable_input_require_grads`, a tied embedding that is trained through the head).

With a tied embedding (lm_head.weight is embed_tokens.weight) and head=True, the head gets its own copy of the weight
(config.tie_word_embeddings is set to False) and the input embedding stays frozen: training the tied weight would
need the gradient through every layer down to the embedding, the backward pass partial fine-tuning avoids.

    report = freeze(model, top_k=4, quantize=True)   # train layers 26..29 + norm + lm_head of a 30-layer model
    print(report)                                    # what is trainable, quantized and run without grad

The no-grad modules are class-swapped per instance (fastft/integrations/class_swap.py): `fastft.unpatch(model)` gives
them their class back; parameter names and the state dict do not change.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

from fastft.integrations.class_swap import original_class, swap_class
from fastft.methods.quantize import quantize_model
from fastft.nn import NF4Linear


@dataclass
class FreezeReport:
    """What `freeze` left trainable and what it did to the frozen part."""

    trainable_params: int = 0
    total_params: int = 0
    trainable_layers: list[int] = field(default_factory=list)   # decoder layer indices with a trainable parameter
    trainable_other: list[str] = field(default_factory=list)    # trainable modules outside the decoder layers
    no_grad_modules: list[str] = field(default_factory=list)    # frozen modules run under torch.no_grad
    quantized_linears: int = 0
    untied_head: bool = False

    def __str__(self) -> str:
        share = self.trainable_params / max(self.total_params, 1)
        lines = [f"fastft.freeze: {self.trainable_params:,} of {self.total_params:,} parameters trainable "
                 f"({share:.1%})",
                 f"  decoder layers trained: {_ranges(self.trainable_layers) or 'none'}",
                 f"  other trainable modules: {', '.join(self.trainable_other) or 'none'}",
                 f"  frozen linear layers held in 4-bit: {self.quantized_linears}",
                 f"  frozen modules run without autograd (nothing saved for backward): {len(self.no_grad_modules)}"]
        if self.untied_head:
            lines.append("  lm_head untied from the input embedding (the head trains, the embedding stays frozen)")
        return "\n".join(lines)


def _ranges(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices) if len(indices) < 4 else f"{indices[0]}..{indices[-1]}"


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(name, ModuleList) of the model's stack of blocks: the ModuleList of config.num_hidden_layers (or, without a
    config, the longest one) whose members share one class."""
    wanted = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [(name, m) for name, m in model.named_modules()
              if isinstance(m, nn.ModuleList) and len(m) and len({type(x) for x in m}) == 1]
    if wanted is not None:
        stacks = [(name, m) for name, m in stacks if len(m) == wanted] or stacks
    if not stacks:
        raise ValueError(f"model must hold its layers in an nn.ModuleList; {type(model).__name__} has none")
    return max(stacks, key=lambda item: len(item[1]))


def _no_grad_forward(self, *args, **kwargs):
    with torch.no_grad():
        return original_class(self).forward(self, *args, **kwargs)


def _untie_head(model: nn.Module) -> bool:
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embedding is None or head.weight is not embedding.weight:
        return False
    head.weight = nn.Parameter(embedding.weight.detach().clone())
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


def freeze(model: nn.Module, top_k: int | None = None, patterns=(), *, head: bool = True, quantize: bool = False,
           blocksize: int = 64, no_grad_below: bool = True) -> FreezeReport:
    """Make only part of `model` (a transformers model, changed in place) trainable.

    top_k: train the top k decoder layers (0 < top_k <= number of layers); None trains none by position.
    patterns: glob patterns (fnmatch) on parameter names, e.g. "*.mlp.*" or "model.layers.1[0-4].*"; matching
    parameters train. head: train the output head and the modules between the last layer and it (the final norm).
    With top_k=None, no patterns and head=False nothing would train: that is refused.
    quantize: hold the frozen linear layers in 4-bit NF4 (blocksize as in bitsandbytes).
    no_grad_below: run the frozen input embeddings and layers below the lowest trainable one under torch.no_grad.
    """
    name, layers = decoder_layers(model)
    patterns = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or not 0 < top_k <= len(layers)):
        raise ValueError(f"top_k must be an int in [1, {len(layers)}] (the model's layers) or None, got {top_k!r}")
    if top_k is None and not patterns and not head:
        raise ValueError("nothing to train: give top_k, patterns or head=True")
    report = FreezeReport(untied_head=head and _untie_head(model))
    report.total_params = sum(p.numel() for p in model.parameters())  # before 4-bit packing halves the count
    chosen = set(range(len(layers) - top_k, len(layers))) if top_k else set()
    layer_of = {}  # parameter name -> layer index
    for index, layer in enumerate(layers):
        for pname, _ in layer.named_parameters():
            layer_of[f"{name}.{index}.{pname}"] = index
    after_layers = _modules_after_layers(model, name) if head else set()
    matched = set()
    for pname, param in model.named_parameters():
        hits = [p for p in patterns if fnmatch.fnmatchcase(pname, p)]
        matched.update(hits)
        owner = pname.rpartition(".")[0]
        param.requires_grad_(layer_of.get(pname) in chosen or bool(hits)
                             or any(owner == m or owner.startswith(m + ".") for m in after_layers))
    unmatched = [p for p in patterns if p not in matched]
    if unmatched:
        raise ValueError(f"patterns {unmatched} match no parameter name of the model "
                         f"(names look like {next(iter(layer_of), 'model.layers.0.mlp.up_proj.weight')!r})")
    if quantize:
        trainable = [m for m, module in model.named_modules()
                     if type(module) is nn.Linear and any(p.requires_grad for p in module.parameters())]
        before = sum(isinstance(m, nn.Linear) for m in model.modules())
        quantize_model(model, blocksize=blocksize, skip=tuple(trainable) + ("lm_head",))
        report.quantized_linears = before - sum(isinstance(m, nn.Linear) for m in model.modules())
        for module in model.modules():  # NF4Linear's bias is trainable by default: frozen here
            if isinstance(module, NF4Linear) and module.bias is not None:
                module.bias.requires_grad_(False)
    if no_grad_below:
        report.no_grad_modules = _run_bottom_without_grad(model, name, layers)
    for index, layer in enumerate(layers):
        if any(p.requires_grad for p in layer.parameters()):
            report.trainable_layers.append(index)
    for mname, module in model.named_modules():
        own = list(module.parameters(recurse=False))
        if own and any(p.requires_grad for p in own) and not mname.startswith(name + "."):
            report.trainable_other.append(mname)
    report.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return report


def _modules_after_layers(model: nn.Module, layers_name: str) -> set[str]:
    """The output head and the siblings registered after the layer stack in its parent (the final norm)."""
    parent_name, _, child = layers_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = list(parent._modules)
    after = {f"{parent_name}.{n}" if parent_name else n for n in names[names.index(child) + 1:]}
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    after.update(n for n, m in model.named_modules() if head is not None and m is head)
    return after


def _run_bottom_without_grad(model: nn.Module, layers_name: str, layers: nn.ModuleList) -> list[str]:
    """Swap the class of the frozen input embeddings and of the layers below the lowest trainable one for a
    subclass whose forward runs under torch.no_grad; nothing when an embedding trains (its gradient flows through
    every layer). Returns the swapped modules' names."""
    embeddings = [(n, m) for n, m in model.named_modules()
                  if isinstance(m, nn.Embedding) and not n.startswith(layers_name + ".")]
    if any(p.requires_grad for _, m in embeddings for p in m.parameters()):
        return []
    lowest = next((i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())),
                  len(layers))
    bottom = embeddings + [(f"{layers_name}.{i}", layers[i]) for i in range(lowest)]
    for _, module in bottom:
        if original_class(module) is None:
            swap_class(module, _no_grad_forward, "its original forward under torch.no_grad (frozen by fastft.freeze)")
    return [n for n, _ in bottom]
