"""Expansion for continual fine-tuning: a new adapter per task over a frozen base, the earlier tasks' adapters
frozen, and the adapter of a task selected by its name.

    model = add_task(base_model, "task1", LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))  # a PeftModel
    ... train task 1 ...
    model = add_task(model, "task2", LoraConfig(...))     # task1's LoRA frozen, task2's trains
    select_task(model, "task1")                           # evaluate task 1 with its own adapter

LoRA adapters are peft's (`get_peft_model` / `add_adapter` / `set_adapter`; fastft.patch fuses them as usual);
bottleneck adapters are fastft's (fastft.adapters, `config` an AdapterConfig). A model holds adapters of one kind.
"""

from __future__ import annotations

from typing import Union

from torch import nn

from fastft.methods import adapters as bottleneck


def _is_peft(model: nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def task_names(model: nn.Module) -> list[str]:
    """The tasks that have an adapter, in the order they were added."""
    if _is_peft(model):
        return list(model.peft_config)
    state = getattr(model, "fastft_adapter_state", None)
    return list(state.configs) if state is not None else []


def _freeze_bottlenecks_except(model: nn.Module, task: str) -> None:
    for slot in (m for m in model.modules() if isinstance(m, bottleneck.AdapterSlot)):
        for name, adapter in slot.adapters.items():
            adapter.requires_grad_(name == task)


def add_task(model: nn.Module, task: str, config) -> nn.Module:
    """A new adapter named `task` (LoRA for a peft LoraConfig, a bottleneck adapter for a fastft AdapterConfig),
    the only trainable parameters from now on (the base and the earlier tasks' adapters frozen) and the active
    one. Returns the model to train (a PeftModel wrapping `model` the first time a LoRA task is added)."""
    from peft import LoraConfig, get_peft_model

    if not isinstance(task, str) or not task.isidentifier():
        raise ValueError(f"task must be a Python identifier (it names the adapter), got {task!r}")
    if task in task_names(model):
        raise ValueError(f"task {task!r} already has an adapter; the model has {task_names(model)}")
    if isinstance(config, LoraConfig):
        if not _is_peft(model):
            if getattr(model, "fastft_adapter_state", None) is not None:
                raise ValueError("model holds bottleneck adapters: add bottleneck tasks (an AdapterConfig)")
            return get_peft_model(model, config, adapter_name=task)
        model.add_adapter(task, config)
        model.set_adapter(task)  # peft: the active adapter trains, the others are frozen
        return model
    if isinstance(config, bottleneck.AdapterConfig):
        if _is_peft(model):
            raise ValueError("model is a PeftModel with LoRA tasks: add LoRA tasks (a peft LoraConfig)")
        bottleneck.add_adapters(model, config, name=task, activate=False)
        select_task(model, task)
        return model
    raise TypeError(f"config must be a peft LoraConfig or a fastft AdapterConfig, got {type(config).__name__}")


def select_task(model: nn.Module, task: Union[str, None]) -> None:
    """Run `task`'s adapter (None: the base model alone, bottleneck adapters only); its parameters are the
    trainable ones."""
    names = task_names(model)
    if task is not None and task not in names:
        raise ValueError(f"unknown task {task!r}; the model has adapters for {names}")
    if _is_peft(model):
        if task is None:
            raise ValueError("task None: a PeftModel always runs one adapter (use model.disable_adapter())")
        model.set_adapter(task)
        return
    bottleneck.set_active(model, task)
    _freeze_bottlenecks_except(model, task)
