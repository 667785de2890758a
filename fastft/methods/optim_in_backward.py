"""AdamW with each parameter's step run inside backward, the moment its gradient is complete, so that gradients are
freed as they are produced and never all exist at once: full / partial fine-tuning's peak memory loses the fp32
gradients (4 bytes per trainable parameter) and AdamW's per-step temporaries over all of them.

    optimizer = AdamWInBackward(model.parameters(), lr=1e-5, weight_decay=0.0)
    for batch in data:
        model(**batch).loss.backward()      # each parameter steps here, in a post-accumulate-grad hook
        optimizer.step()                    # closes the step (nothing left to compute)
        optimizer.zero_grad()

    trainer = Trainer(model, args, ..., optimizers=(adamw_in_backward_for_trainer(model, args), None))

The update is torch.optim.AdamW's single-tensor formula, applied in slices of 2^20 elements so that its
temporaries stay small, with AdamW's state keys (step, exp_avg, exp_avg_sq: a checkpoint's optimizer state loads
into plain AdamW and back) and the hyperparameters of the parameter's group read at each step (LR schedulers work
on `param_groups` as usual). It equals AdamW stepped after backward exactly when
nothing between backward and the step looks at all gradients together:
- global gradient-norm clipping needs every gradient before any parameter moves: not possible here (clipping
  after backward would see no gradient); `adamw_in_backward_for_trainer` refuses max_grad_norm > 0;
- gradient accumulation needs gradients summed over several backward passes: a second backward that reaches a
  parameter before `step()` closed the step raises RuntimeError instead of stepping twice;
- DDP / FSDP reduce gradients after they accumulate: not supported (one process).
A backward node that still needs a parameter's value after the parameter stepped cannot read a changed value
silently: the in-place update bumps the parameter's version counter and autograd raises.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn

CHUNK = 1 << 20  # elements per slice of the update: AdamW's temporaries are 2 x 4 MiB, not 2 x the parameter


def _adamw_update(param, grad, exp_avg, exp_avg_sq, step: float, group: dict) -> None:
    """torch.optim.AdamW's single-tensor update (decoupled weight decay, no amsgrad), in place, on one slice.
    Every operation is elementwise, so the slices together give the same numbers as the whole tensor."""
    lr, (beta1, beta2), eps, weight_decay = group["lr"], group["betas"], group["eps"], group["weight_decay"]
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / (1 - beta1 ** step))


class AdamWInBackward(torch.optim.Optimizer):
    """torch.optim.AdamW (amsgrad off) stepped per parameter inside backward.

    params: parameters or param groups, as for AdamW; the hyperparameters default to AdamW's. A parameter listed
    twice (tied weights) gets one hook and one state. State per parameter: step, exp_avg, exp_avg_sq (AdamW's).
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2):
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"lr must be a float >= 0, got {lr!r}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self._group_of: dict[nn.Parameter, int] = {}  # index into param_groups (load_state_dict replaces the dicts)
        self._stepped: set[nn.Parameter] = set()
        self._handles = []
        for index, group in enumerate(self.param_groups):
            for param in group["params"]:
                if param in self._group_of:
                    continue
                if not param.requires_grad:
                    raise ValueError("params must require grad: a frozen parameter never gets a gradient to step on")
                self._group_of[param] = index
                self._handles.append(param.register_post_accumulate_grad_hook(self._step_parameter))

    @torch.no_grad()
    def _step_parameter(self, param: nn.Parameter) -> None:
        if param in self._stepped:
            raise RuntimeError("a second backward reached a parameter before optimizer.step() closed the step: "
                               "AdamWInBackward steps in backward and cannot accumulate gradients over several "
                               "backward passes (use gradient_accumulation_steps=1, or plain AdamW)")
        group, state = self.param_groups[self._group_of[param]], self.state[param]
        if not state:  # AdamW's state, as torch.optim.AdamW initialises it
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        tensors = (param, param.grad, state["exp_avg"], state["exp_avg_sq"])
        if all(t.is_contiguous() for t in tensors):  # chunks keep AdamW's temporaries small
            chunks = zip(*(t.view(-1).split(CHUNK) for t in tensors))
        else:
            chunks = [tensors]
        for chunk in chunks:
            _adamw_update(*chunk, state["step"].item(), group)
        param.grad = None
        self._stepped.add(param)

    def step(self, closure=None):
        """Close the step: every parameter already stepped in backward. A closure is refused (it would run a
        backward that steps the parameters again)."""
        if closure is not None:
            raise ValueError("AdamWInBackward.step takes no closure: parameters step inside backward")
        self._stepped.clear()
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Gradients are freed as each parameter steps; this clears any left by a backward outside the hooks."""
        super().zero_grad(set_to_none=True)

    def remove_hooks(self) -> None:
        """Detach the hooks: later backward passes only accumulate gradients."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def adamw_in_backward_for_trainer(model: nn.Module, args) -> AdamWInBackward:
    """The AdamWInBackward that HF Trainer's default AdamW would be for `args` (learning_rate, adam_beta1/2,
    adam_epsilon, weight_decay; no decay on biases and norm weights, as Trainer does), for
    `Trainer(..., optimizers=(optimizer, None))` (Trainer adds its LR scheduler on top).

    Raises ValueError when args asks for what a step in backward cannot do: max_grad_norm > 0 (set it to 0),
    gradient_accumulation_steps > 1, more than one process."""
    from transformers import Trainer

    if args.max_grad_norm and args.max_grad_norm > 0:
        raise ValueError(f"args.max_grad_norm={args.max_grad_norm}: global gradient clipping needs every gradient "
                         "before any parameter steps, and AdamWInBackward steps each one as soon as it is "
                         "computed; set max_grad_norm=0 (no clipping) or use plain AdamW")
    if args.gradient_accumulation_steps != 1:
        raise ValueError(f"args.gradient_accumulation_steps={args.gradient_accumulation_steps}: AdamWInBackward "
                         "steps in every backward pass; use 1 (a larger per-device batch) or plain AdamW")
    if args.world_size != 1:
        raise ValueError(f"args.world_size={args.world_size}: AdamWInBackward runs in one process only "
                         "(DDP / FSDP reduce gradients after the step would have happened)")
    decay = set(Trainer.get_decay_parameter_names(None, model))
    groups = defaultdict(list)
    seen = set()
    for name, param in model.named_parameters():
        if param.requires_grad and param not in seen:
            seen.add(param)
            groups[name in decay].append(param)
    param_groups = [{"params": groups[decays], "weight_decay": args.weight_decay if decays else 0.0}
                    for decays in (True, False) if groups[decays]]
    return AdamWInBackward(param_groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                           eps=args.adam_epsilon)
