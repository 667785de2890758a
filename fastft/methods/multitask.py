"""Multi-task fine-tuning: per-sample routed LoRA (one batch mixing tasks, each row through its task's peft
adapter in one fused call per layer), per-task heads, loss weighting (static, uncertainty, GradNorm) and task
sampling (proportional, temperature, round-robin).

    model = get_peft_model(base, LoraConfig(...), adapter_name="a"); model.add_adapter("b", LoraConfig(...))
    with routed_lora(model, ["a", "b"], task_ids):        # task_ids: (batch,) ints, row i -> adapter task_ids[i]
        loss = model(input_ids=ids, labels=ids).loss      # trains every adapter its rows use, in one pass
    loss.backward()

peft runs mixed batches only in inference (`adapter_names` is refused in training); here every peft LoRA layer
computes base(x) + fastft::routed_lora(x, As, Bs, scales, route) (rows grouped by adapter inside the op, forward
and backward), with the route repeated over each row's tokens. Routing needs lora_dropout 0 and plain LoRA (no
DoRA, no lora_bias); anything else raises a ValueError naming the layer.
"""

from __future__ import annotations

import contextlib
import math
import random
from typing import Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from fastft.formats.bottleneck import ACTIVATIONS
from fastft.ops import routed_bottleneck as routed_ops
from fastft.ops import routed_lora as routed_lora_ops


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer) and hasattr(m, "base_layer")]


def _check_layer(name: str, layer: nn.Module, adapters: Sequence[str]) -> None:
    for a in adapters:
        if a not in layer.lora_A:
            raise ValueError(f"{name}: no LoRA adapter {a!r} (it has {list(layer.lora_A)})")
        if not isinstance(layer.lora_dropout[a], nn.Identity):
            raise ValueError(f"{name}: adapter {a!r} has lora_dropout > 0; routed LoRA needs lora_dropout=0")
        if layer.use_dora.get(a, False) or getattr(layer, "lora_bias", {}).get(a, False):
            raise ValueError(f"{name}: adapter {a!r} uses DoRA or lora_bias, which routed LoRA does not support")


def _routed_forward(layer: nn.Module, adapters: Sequence[str], route: Tensor, x: Tensor, *args, **kwargs):
    result = layer.base_layer(x, *args, **kwargs)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] % route.shape[0]:
        raise ValueError(f"routed LoRA: {rows.shape[0]} token rows do not split over {route.shape[0]} routed rows")
    per_token = route.repeat_interleave(rows.shape[0] // route.shape[0])
    As = [layer.lora_A[a].weight for a in adapters]
    Bs = [layer.lora_B[a].weight for a in adapters]
    scales = [float(layer.scaling[a]) for a in adapters]
    delta = routed_lora_ops.routed_lora(rows.to(As[0].dtype), As, Bs, scales, per_token)
    return (result.reshape(-1, result.shape[-1]) + delta.to(result.dtype)).reshape(result.shape)


@contextlib.contextmanager
def routed_lora(model: nn.Module, adapters: Sequence[str], task_ids) -> Iterator[None]:
    """Inside the block, every peft LoRA layer of `model` runs row i of the batch through adapter
    adapters[task_ids[i]] (task id -1: the base alone), whatever adapter is active; the adapters' parameters get
    their gradients from their rows. `task_ids`: (batch,) ints in [-1, len(adapters))."""
    adapters = list(adapters)
    route = torch.as_tensor(task_ids, dtype=torch.int64)
    if route.dim() != 1:
        raise ValueError(f"task_ids must be one id per batch row (1-D), got shape {tuple(route.shape)}")
    if route.numel() and (int(route.min()) < -1 or int(route.max()) >= len(adapters)):
        raise ValueError(f"task_ids must be in [-1, {len(adapters)}) (indices into adapters {adapters}), "
                         f"got values in [{int(route.min())}, {int(route.max())}]")
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("model has no peft LoRA layer to route")
    for name, layer in layers:
        _check_layer(name, layer, adapters)
    for _, layer in layers:
        device = layer.lora_A[adapters[0]].weight.device
        layer.forward = lambda x, *a, _layer=layer, _route=route.to(device), **k: _routed_forward(
            _layer, adapters, _route, x, *a, **k)
    try:
        yield
    finally:
        for _, layer in layers:
            del layer.forward  # back to the class's forward


def _routed_slot_run(slot, adapters: Sequence[str], route: Tensor, output: Tensor, source: Optional[Tensor]):
    """The slot's adapters per batch row in one fastft::routed_bottleneck call (rows grouped by task inside the op,
    forward and backward); rows of task -1, or of a task without an adapter in this slot, pass unchanged. Adapters
    with a LayerNorm run block by block through their modules instead (the op has no norm)."""
    if output.shape[0] != route.shape[0]:
        raise ValueError(f"routed adapters: output has {output.shape[0]} rows, task_ids {route.shape[0]}")
    present = [name in slot.adapters for name in adapters]
    modules = [slot.adapters[name] if here else None for name, here in zip(adapters, present)]
    if any(m is not None and m.norm is not None for m in modules):
        return _routed_slot_blocks(slot, adapters, route, output, source)
    used = [i for i, here in enumerate(present) if here]
    if not used:
        return output
    remap = torch.full((len(adapters) + 1,), -1, dtype=torch.int64, device=route.device)
    remap[torch.tensor(used, device=route.device) + 1] = torch.arange(len(used), device=route.device)
    per_token = remap[route + 1].repeat_interleave(output[0].numel() // output.shape[-1])
    chosen = [modules[i] for i in used]
    parallel = [adapters[i] in slot.parallel for i in used]
    bias = lambda b, w: b if b is not None else w.new_empty(0)  # noqa: E731  (the op's "no bias")
    return routed_ops.routed_bottleneck(
        output, source if any(parallel) else None, [m.down.weight for m in chosen],
        [bias(m.down.bias, m.down.weight) for m in chosen], [m.up.weight for m in chosen],
        [bias(m.up.bias, m.up.weight) for m in chosen], [ACTIVATIONS.index(m.activation) for m in chosen],
        [m.scale for m in chosen], parallel, per_token)


def _routed_slot_blocks(slot, adapters: Sequence[str], route: Tensor, output: Tensor, source: Optional[Tensor]):
    """Rows grouped by task once (a stable sort), each task's block through its adapter module, one scatter back."""
    order = torch.argsort(route, stable=True)
    sizes = torch.bincount(route + 1, minlength=len(adapters) + 1).tolist()
    blocks = output.index_select(0, order).split(sizes)
    sources = source.index_select(0, order).split(sizes) if source is not None else [None] * len(blocks)
    parts = [blocks[0]]
    for name, block, src in zip(adapters, blocks[1:], sources[1:]):
        adapter = slot.adapters[name] if name in slot.adapters else None
        if adapter is None or block.shape[0] == 0:
            parts.append(block)
        elif name in slot.parallel:
            parts.append(adapter(src.to(block.dtype), residual=block))
        else:
            parts.append(adapter(block))
    return torch.empty_like(output).index_copy_(0, order, torch.cat(parts))


@contextlib.contextmanager
def routed_adapters(model: nn.Module, adapters: Sequence[str], task_ids) -> Iterator[None]:
    """Per-sample routing of fastft's bottleneck adapters (fastft.adapters): inside the block, batch row i runs
    through adapter adapters[task_ids[i]] alone (task id -1: none), whatever adapters are active."""
    from fastft.methods.adapters import AdapterSlot

    adapters = list(adapters)
    route = torch.as_tensor(task_ids, dtype=torch.int64)
    if route.dim() != 1 or (route.numel() and (int(route.min()) < -1 or int(route.max()) >= len(adapters))):
        raise ValueError(f"task_ids must be 1-D with values in [-1, {len(adapters)}), got {route.tolist()}")
    slots = [m for m in model.modules() if isinstance(m, AdapterSlot)]
    known = set().union(*(slot.adapters.keys() for slot in slots)) if slots else set()
    unknown = [a for a in adapters if a not in known]
    if unknown:
        raise ValueError(f"unknown adapter(s) {unknown}; the model has {sorted(known)}")
    for slot in slots:
        slot.run = lambda output, source, _slot=slot: _routed_slot_run(_slot, adapters, route.to(output.device),
                                                                        output, source)
    try:
        yield
    finally:
        for slot in slots:
            del slot.run


class TaskHeads(nn.Module):
    """One classification head per task on the mean-pooled last hidden states: heads[task](pooled) -> logits."""

    def __init__(self, hidden_size: int, num_labels: dict[str, int], dtype=torch.float32, device=None):
        super().__init__()
        self.heads = nn.ModuleDict({t: nn.Linear(hidden_size, n, dtype=dtype, device=device)
                                    for t, n in num_labels.items()})

    def forward(self, task: str, hidden: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; the heads are {list(self.heads)}")
        if attention_mask is None:
            pooled = hidden.mean(1)
        else:
            mask = attention_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.heads[task](pooled.to(self.heads[task].weight.dtype))


def static_weighting(losses: dict[str, Tensor], weights: dict[str, float]) -> Tensor:
    """sum_t weights[t] * losses[t]."""
    unknown = set(losses) - set(weights)
    if unknown:
        raise ValueError(f"weights has no entry for task(s) {sorted(unknown)}")
    return sum(weights[t] * loss for t, loss in losses.items())


class UncertaintyWeighting(nn.Module):
    """Kendall et al. 2018: sum_t 0.5 * exp(-s_t) * L_t + 0.5 * s_t with learned s_t = log sigma_t^2 (train these
    parameters with the model's)."""

    def __init__(self, tasks: Sequence[str]):
        super().__init__()
        self.log_vars = nn.ParameterDict({t: nn.Parameter(torch.zeros(())) for t in tasks})

    def forward(self, losses: dict[str, Tensor]) -> Tensor:
        unknown = set(losses) - set(self.log_vars)
        if unknown:
            raise ValueError(f"unknown task(s) {sorted(unknown)}; the weighting has {list(self.log_vars)}")
        return sum(0.5 * torch.exp(-self.log_vars[t]) * loss + 0.5 * self.log_vars[t] for t, loss in losses.items())


class GradNorm(nn.Module):
    """GradNorm (Chen et al. 2018): task weights w_t (summing to the number of tasks) learned so that the norms of
    the weighted task gradients on `shared` parameters follow the tasks' relative training rates to the power
    alpha. `loss(losses)` returns sum_t w_t L_t for the model's backward and leaves the weights' gradient (the
    GradNorm objective's) in `self.weights.grad`; `renormalize()` after the optimizer step."""

    def __init__(self, tasks: Sequence[str], shared: Sequence[nn.Parameter], alpha: float = 1.5):
        super().__init__()
        self.tasks = list(tasks)
        self.weights = nn.Parameter(torch.ones(len(self.tasks)))
        self.shared = list(shared)
        self.alpha = alpha
        self.initial: Optional[Tensor] = None

    def loss(self, losses: dict[str, Tensor]) -> Tensor:
        stacked = torch.stack([losses[t] for t in self.tasks])
        if self.initial is None:
            self.initial = stacked.detach().clone()
        norms = []
        for i in range(len(self.tasks)):
            grads = torch.autograd.grad(stacked[i], self.shared, retain_graph=True, allow_unused=True)
            g = torch.sqrt(sum((x.detach() ** 2).sum() for x in grads if x is not None))
            norms.append(self.weights[i] * g)
        norms = torch.stack(norms)
        ratio = stacked.detach() / self.initial
        target = (norms.mean() * (ratio / ratio.mean()) ** self.alpha).detach()
        (grad_w,) = torch.autograd.grad((norms - target).abs().sum(), [self.weights])
        self.weights.grad = grad_w
        return (self.weights.detach() * stacked).sum()

    @torch.no_grad()
    def renormalize(self) -> None:
        self.weights.clamp_(min=1e-3).mul_(len(self.tasks) / self.weights.sum())


STRATEGIES = ("proportional", "temperature", "round_robin")


class TaskSampler:
    """Which task each step trains: "proportional" to the tasks' sizes, "temperature" (p_t ~ size_t^(1/T), T = 1
    proportional, large T uniform) or "round_robin"; an endless iterator of task names."""

    def __init__(self, sizes: dict[str, int], strategy: str = "proportional", temperature: float = 1.0,
                 seed: int = 0):
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if not sizes or any(not isinstance(n, int) or n < 1 for n in sizes.values()):
            raise ValueError(f"sizes must map each task to an int >= 1, got {sizes!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        self.tasks = list(sizes)
        power = 1.0 if strategy == "proportional" else 1.0 / temperature
        weights = [sizes[t] ** power for t in self.tasks]
        self.probabilities = [w / sum(weights) for w in weights]
        self.strategy = strategy
        self._rng = random.Random(seed)
        self._step = 0

    def __iter__(self) -> "TaskSampler":
        return self

    def __next__(self) -> str:
        self._step += 1
        if self.strategy == "round_robin":
            return self.tasks[(self._step - 1) % len(self.tasks)]
        return self._rng.choices(self.tasks, weights=self.probabilities)[0]
