"""Bottleneck adapters added to transformers models: `add_adapters`, `set_active`, `save_adapter`, `load_adapter`,
`remove_adapters`.

Where adapters go is found from module types, not model names: the model's blocks are the longest `nn.ModuleList`
of one block class containing an attention module (a module whose class name ends in "Attention"); in each block
the attention sublayer's projections are the Linear / Conv1D / NF4Linear layers inside that module and the feed-forward
sublayer's are the block's other ones, in registration order (Llama/Qwen2: q..o_proj and gate..down_proj; GPT-2:
c_attn, c_proj and c_fc, c_proj; BERT: query..attention.output.dense and intermediate.dense, output.dense).

- "houlsby": an adapter on the output of each sublayer's last projection (attention and feed-forward),
  applied before the block's residual add: h -> h + up(act(down(h))).
- "pfeiffer": the same after the feed-forward sublayer only.
- "parallel" (He et al. 2022): a branch from the feed-forward sublayer's input (the input of its first projection)
  added to its output: ffn(x) + scale * up(act(down(x))).

Adapters are submodules of the projection they follow (`<projection>.fastft_adapters.<name>`), run by a forward
hook (a parallel branch gets its input from a forward pre-hook on the sublayer's first projection, through storage
per thread: no module holds anything of a call, so threads may share a model); the base model's own modules,
parameter names and forward code are untouched, and `remove_adapters` restores it exactly (including which
parameters required grad). Several named adapters can live in one model; the active ones (`set_active`) run in
the order given, so a stack ["language", "task"] composes them.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from torch import nn

from fastft.nn import NF4Linear
from fastft.nn.bottleneck import INITS, BottleneckAdapter, check_activation

PLACEMENTS = ("houlsby", "pfeiffer", "parallel")
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


@dataclass
class AdapterConfig:
    """placement: "houlsby" | "pfeiffer" | "parallel"; bottleneck_size (or hidden_size // reduction_factor);
    activation: "relu" | "gelu" | "gelu_tanh" | "silu"; layer_norm before the down-projection; scale of the branch;
    init: "near_identity" | "default" (up is zero either way)."""

    placement: str = "houlsby"
    reduction_factor: int = 16
    bottleneck_size: Optional[int] = None
    activation: str = "relu"
    layer_norm: bool = False
    scale: float = 1.0
    init: str = "near_identity"

    def __post_init__(self):
        if self.placement not in PLACEMENTS:
            raise ValueError(f"placement must be one of {PLACEMENTS}, got {self.placement!r}")
        check_activation(self.activation)
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")


class AdapterSlot(nn.Module):
    """The adapters that follow one projection, and which of them run (in order)."""

    def __init__(self):
        super().__init__()
        self.adapters = nn.ModuleDict()
        self.parallel: set[str] = set()
        self.active: list[str] = []

    def run(self, output: torch.Tensor, source: Optional[torch.Tensor]) -> torch.Tensor:
        """`output` through the active adapters; `source` (the sublayer's input) feeds the parallel ones."""
        for name in self.active:
            adapter = self.adapters[name]
            if name in self.parallel:
                if source is None:
                    raise RuntimeError(f"parallel adapter {name!r}: its sublayer's first projection did not run "
                                       "before the projection it follows, in this thread")
                output = adapter(source.to(output.dtype), residual=output)
            else:
                output = adapter(output)
        return output


class _SublayerInputs(threading.local):
    """Per thread, what a parallel branch reads: slot -> the input its sublayer's first projection was called with,
    kept from that call to the output of the projection the slot follows (same thread, same forward). Nothing of a
    call is stored on a module: forwards of one model in several threads each see their own inputs, and a copy of
    the model (deepcopy, pickle) holds none."""

    def __init__(self):
        self.by_slot: dict[AdapterSlot, torch.Tensor] = {}


_SUBLAYER_INPUTS = _SublayerInputs()


@dataclass
class _Site:
    output: nn.Module  # the projection whose output the adapters change
    parallel_input: nn.Module  # the projection whose input feeds parallel adapters
    sublayer: str  # "attention" | "ffn"


@dataclass
class _State:
    configs: dict = dataclasses.field(default_factory=dict)  # name -> AdapterConfig
    active: list = dataclasses.field(default_factory=list)
    base_requires_grad: dict = dataclasses.field(default_factory=dict)  # parameter name -> flag before adapters
    handles: dict = dataclasses.field(default_factory=dict)  # projection's name -> hook handles


def _projections(module: nn.Module) -> list[nn.Module]:
    """The Linear / Conv1D / NF4Linear (a `fastft.quantize_model` base) layers of `module` in registration order,
    leaving out those of adapters."""
    from transformers.pytorch_utils import Conv1D

    in_adapters = {id(m) for slot in module.modules() if isinstance(slot, AdapterSlot) for m in slot.modules()}
    return [m for m in module.modules()
            if isinstance(m, (nn.Linear, Conv1D, NF4Linear)) and id(m) not in in_adapters]


def _attention(block: nn.Module) -> Optional[nn.Module]:
    return next((m for m in block.modules() if m is not block and type(m).__name__.endswith("Attention")), None)


def _blocks(model: nn.Module) -> list[nn.Module]:
    candidates = [
        list(m) for m in model.modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and len({type(b) for b in m}) == 1 and _attention(m[0]) is not None
    ]
    if not candidates:
        raise ValueError(f"found no transformer blocks in {type(model).__name__}: expected an nn.ModuleList of "
                         "blocks that each hold an attention module (a class named ...Attention)")
    return max(candidates, key=len)


def _sites(model: nn.Module) -> list[_Site]:
    sites = []
    for index, block in enumerate(_blocks(model)):
        attention = _attention(block)
        attention_projections = _projections(attention)
        inside = {id(m) for m in attention_projections}
        ffn_projections = [m for m in _projections(block) if id(m) not in inside]
        if len(attention_projections) < 2 or len(ffn_projections) < 2:
            raise ValueError(f"block {index} ({type(block).__name__}) has {len(attention_projections)} attention and "
                             f"{len(ffn_projections)} feed-forward projections; expected at least 2 of each")
        sites.append(_Site(attention_projections[-1], attention_projections[0], "attention"))
        sites.append(_Site(ffn_projections[-1], ffn_projections[0], "ffn"))
    return sites


def _state(model: nn.Module) -> Optional[_State]:
    return getattr(model, "fastft_adapter_state", None)


def _hidden_size(projection: nn.Module) -> int:
    from transformers.pytorch_utils import Conv1D

    return projection.nf if isinstance(projection, Conv1D) else projection.out_features


def _adapter_dtype(projection: nn.Module) -> torch.dtype:
    dtype = projection.weight.dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32  # fp32 adapters on half models, as peft


def _output_hook(module, args, output):
    slot = module.fastft_adapters
    return slot.run(output, _SUBLAYER_INPUTS.by_slot.pop(slot, None))


def _capture_input(slot: AdapterSlot, module, args):
    _SUBLAYER_INPUTS.by_slot[slot] = args[0]


def add_adapters(model: nn.Module, config: Optional[AdapterConfig] = None, name: str = "default",
                 activate: bool = True, modules_to_train: Sequence[str] = ()) -> list[str]:
    """Add a bottleneck adapter named `name` to every block of a transformers model (in place), freeze the base
    model's parameters except those of `modules_to_train` (module names or their last component, e.g.
    "classifier" for a new task head), and (with `activate`) append it to the active adapters. Returns the names
    of the projections the new adapters follow."""
    config = config or AdapterConfig()
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be a fastft.adapters.AdapterConfig, got {type(config).__name__}")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name must be a Python identifier (it becomes a module name), got {name!r}")
    state = _state(model)
    if state is not None and name in state.configs:
        raise ValueError(f"an adapter named {name!r} already exists; remove it first or pick another name")
    sites = _sites(model)
    wanted = [s for s in sites if config.placement == "houlsby" or s.sublayer == "ffn"]
    to_train = []
    for module_name in (modules_to_train,) if isinstance(modules_to_train, str) else modules_to_train:
        matches = [m for n, m in model.named_modules() if n == module_name or n.endswith("." + module_name)]
        if not matches:
            raise ValueError(f"modules_to_train: no module named {module_name!r} in {type(model).__name__}")
        to_train += matches
    if state is None:
        state = _State(base_requires_grad={n: p.requires_grad for n, p in model.named_parameters()})
        object.__setattr__(model, "fastft_adapter_state", state)
        for p in model.parameters():
            p.requires_grad_(False)
    for module in to_train:
        module.requires_grad_(True)
    names = {id(m): n for n, m in model.named_modules()}
    placed = []
    for site in wanted:
        projection = site.output
        projection_name = names[id(projection)]
        slot = getattr(projection, "fastft_adapters", None)
        if slot is None:
            slot = AdapterSlot()
            projection.fastft_adapters = slot
            state.handles[projection_name] = [projection.register_forward_hook(_output_hook)]
        if config.placement == "parallel":
            if not slot.parallel:  # the first parallel adapter here: capture the sublayer's input
                # a partial, not a closure, so that deepcopy(model) points the copy's hook at the copy's slot
                hook = site.parallel_input.register_forward_pre_hook(functools.partial(_capture_input, slot))
                state.handles[projection_name].append(hook)
            slot.parallel.add(name)
        weight = projection.weight
        slot.adapters[name] = BottleneckAdapter(
            _hidden_size(projection), config.reduction_factor, config.bottleneck_size, config.activation,
            config.init, config.layer_norm, config.scale, dtype=_adapter_dtype(projection), device=weight.device)
        placed.append(projection_name)
    state.configs[name] = config
    if activate:
        set_active(model, state.active + [name])
    return placed


def _slots(model: nn.Module) -> list[AdapterSlot]:
    return [m for m in model.modules() if isinstance(m, AdapterSlot)]


def set_active(model: nn.Module, names: Union[str, Sequence[str], None]) -> None:
    """Run these adapters (one name, or a stack applied in order); None or [] runs none."""
    state = _state(model)
    if state is None:
        raise ValueError("model has no fastft adapters; call fastft.adapters.add_adapters first")
    names = [] if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; the model has {sorted(state.configs)}")
    if len(set(names)) != len(names):
        raise ValueError(f"names must not repeat, got {names}")
    state.active = names
    for slot in _slots(model):
        slot.active = [n for n in names if n in slot.adapters]


def active_adapters(model: nn.Module) -> list[str]:
    state = _state(model)
    return list(state.active) if state is not None else []


def adapter_state_dict(model: nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The parameters of adapter `name`, keyed by their names in the model."""
    state = _state(model)
    if state is None or name not in state.configs:
        raise ValueError(f"model has no adapter named {name!r}")
    marker = f".fastft_adapters.adapters.{name}."
    return {k: v for k, v in model.state_dict().items() if marker in k}


def save_adapter(model: nn.Module, directory: Union[str, Path], name: str = "default") -> Path:
    """Write adapter `name` alone: `adapter_config.json` and `adapter_model.safetensors` under `directory`."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in adapter_state_dict(model, name).items()}
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    config = {"name": name, "adapter": dataclasses.asdict(_state(model).configs[name]),
              "base_model_class": type(model).__name__}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_adapter(model: nn.Module, directory: Union[str, Path], name: Optional[str] = None,
                 activate: bool = True) -> str:
    """Add the adapter saved in `directory` to `model` (under `name`, default: its saved name) and load its
    weights; every saved tensor must match a new adapter parameter and vice versa. Returns the name."""
    from safetensors.torch import load_file

    directory = Path(directory)
    saved = json.loads((directory / CONFIG_FILE).read_text())
    saved_name = saved["name"]
    name = name or saved_name
    tensors = load_file(str(directory / WEIGHTS_FILE))
    marker_from, marker_to = f".adapters.{saved_name}.", f".adapters.{name}."
    tensors = {k.replace(marker_from, marker_to): v for k, v in tensors.items()}
    add_adapters(model, AdapterConfig(**saved["adapter"]), name, activate=activate)
    expected = adapter_state_dict(model, name)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        remove_adapters(model, [name])
        raise ValueError(f"{directory / WEIGHTS_FILE} does not fit this model: missing {missing[:3]}"
                         f"{'...' if len(missing) > 3 else ''}, unexpected {unexpected[:3]}"
                         f"{'...' if len(unexpected) > 3 else ''}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            target = params[key]
            if target.shape != value.shape:
                remove_adapters(model, [name])
                raise ValueError(f"{key}: saved shape {tuple(value.shape)} != model's {tuple(target.shape)}")
            target.copy_(value)
    return name


def remove_adapters(model: nn.Module, names: Union[str, Sequence[str], None] = None) -> None:
    """Remove the named adapters (default: all). When none remain, the hooks go and the base model's parameters
    get back the requires_grad flags they had before `add_adapters`."""
    state = _state(model)
    if state is None:
        raise ValueError("model has no fastft adapters")
    names = list(state.configs) if names is None else [names] if isinstance(names, str) else list(names)
    unknown = [n for n in names if n not in state.configs]
    if unknown:
        raise ValueError(f"unknown adapter name(s) {unknown}; the model has {sorted(state.configs)}")
    for module_name, module in list(model.named_modules()):
        slot = getattr(module, "fastft_adapters", None)
        if not isinstance(slot, AdapterSlot):
            continue
        for name in names:
            if name in slot.adapters:
                del slot.adapters[name]
                slot.parallel.discard(name)
        if len(slot.adapters) == 0:
            for handle in state.handles.pop(module_name):
                handle.remove()
            _SUBLAYER_INPUTS.by_slot.pop(slot, None)
            del module.fastft_adapters
    for name in names:
        del state.configs[name]
    if state.configs:
        set_active(model, [n for n in state.active if n in state.configs])
        return
    for parameter_name, parameter in model.named_parameters():
        parameter.requires_grad_(state.base_requires_grad[parameter_name])
    object.__delattr__(model, "fastft_adapter_state")
