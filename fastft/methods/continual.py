"""Continual fine-tuning: EWC (Kirkpatrick et al. 2017; online EWC, Schwarz et al. 2018) with fastft's fused
penalty pass, a replay buffer, and expansion (one adapter per task over a frozen base: fastft/methods/expansion.py).

    ewc = EWC(model, EWCConfig(lam=100.0, mode="online", decay=0.9))
    ... train task 1 ...
    ewc.consolidate(task1_loader)                  # Fisher of the trainable parameters + anchors
    ... train task 2: after each loss.backward(), before optimizer.step():
    penalty = ewc.apply_()                         # grads += lam * F * (theta - theta*), one fused pass

or `EWCTrainer(model=..., ewc=ewc, ...)`, a transformers Trainer that adds the penalty after each backward.

The penalty is lam / 2 * sum_t sum_i F_t,i (theta_i - theta*_t,i)^2 over the parameters that required grad when
each term was consolidated (LoRA / adapters: theirs only; full fine-tuning: all of them). "separate" keeps one term
per task (Kirkpatrick); "online" keeps one term whose Fisher is decay * F_old + F_new and whose anchor is the
latest parameters (Schwarz). F and theta* are stored in `storage_dtype` (fp32 or bf16, fp64 for tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor, nn
from transformers import Trainer

from fastft.ewc import STORAGE_DTYPES, ewc_penalty_

MODES = ("separate", "online")
FISHER_KINDS = ("empirical", "per_sample")


@dataclass
class EWCConfig:
    """lam: penalty strength (>= 0); mode: "separate" (a term per task) | "online" (one decayed term); decay: the
    online Fisher's decay gamma in [0, 1]; fisher: "empirical" (squared gradient of each batch's mean loss) |
    "per_sample" (mean of squared per-example gradients); storage_dtype of F and theta*; max_batches per Fisher
    estimate (None: the whole loader); progress: a progress bar while estimating."""

    lam: float = 1.0
    mode: str = "separate"
    decay: float = 1.0
    fisher: str = "empirical"
    storage_dtype: torch.dtype = torch.float32
    max_batches: Optional[int] = None
    progress: bool = True

    def __post_init__(self):
        if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not math.isfinite(self.lam) \
                or self.lam < 0:
            raise ValueError(f"lam must be a finite real number >= 0, got {self.lam!r}")
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not 0 <= self.decay <= 1:
            raise ValueError(f"decay must be in [0, 1], got {self.decay!r}")
        if self.fisher not in FISHER_KINDS:
            raise ValueError(f"fisher must be one of {FISHER_KINDS}, got {self.fisher!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"storage_dtype must be one of {STORAGE_DTYPES}, got {self.storage_dtype}")
        if self.max_batches is not None and (not isinstance(self.max_batches, int) or self.max_batches < 1):
            raise ValueError(f"max_batches must be None or an int >= 1, got {self.max_batches!r}")


def default_loss(model: nn.Module, batch: dict) -> Tensor:
    """The loss a transformers model returns for a batch with labels."""
    return model(**batch).loss


def _rows(batch: dict) -> Iterable[dict]:
    """The batch's examples one at a time, each as a batch of one."""
    size = next(v.shape[0] for v in batch.values() if isinstance(v, Tensor))
    for i in range(size):
        yield {k: v[i:i + 1] if isinstance(v, Tensor) else v for k, v in batch.items()}


def _progress(iterable, enabled: bool, total: Optional[int]):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc="Fisher", unit="batch")


def estimate_fisher(model: nn.Module, loader: Iterable[dict], *, kind: str = "empirical",
                    loss_fn: Callable[[nn.Module, dict], Tensor] = default_loss, max_batches: Optional[int] = None,
                    progress: bool = True) -> dict[str, Tensor]:
    """Diagonal Fisher of the parameters that require grad, {name: fp32 tensor shaped like the parameter}.
    "empirical": the mean over batches of the squared gradient of each batch's loss; "per_sample": the mean over
    examples of the squared gradient of each example's loss (one backward per example). Their .grad are left as
    they were. Runs in the model's current mode (call model.eval() first for no dropout)."""
    if kind not in FISHER_KINDS:
        raise ValueError(f"kind must be one of {FISHER_KINDS}, got {kind!r}")
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("model has no parameter that requires grad: nothing to estimate a Fisher for")
    saved = [p.grad for _, p in named]
    fisher = {n: torch.zeros_like(p, dtype=torch.float32, memory_format=torch.contiguous_format) for n, p in named}
    count = 0
    total = max_batches if max_batches is not None else (len(loader) if hasattr(loader, "__len__") else None)
    try:
        for b, batch in enumerate(_progress(loader, progress, total)):
            if max_batches is not None and b >= max_batches:
                break
            for part in (_rows(batch) if kind == "per_sample" else (batch,)):
                for _, p in named:
                    p.grad = None
                loss_fn(model, part).backward()
                for n, p in named:
                    if p.grad is not None:
                        fisher[n].addcmul_(p.grad, p.grad)
                count += 1
    finally:
        for (_, p), grad in zip(named, saved):
            p.grad = grad
    if count == 0:
        raise ValueError("loader gave no batch: cannot estimate a Fisher from nothing")
    for f in fisher.values():
        f.div_(count)
    return fisher


@dataclass
class _Term:
    names: list[str]
    params: list[nn.Parameter]
    fisher: list[Tensor]
    anchor: list[Tensor]


class EWC:
    """EWC's state for one model: the consolidated terms (Fisher + anchor per parameter) and the fused penalty."""

    def __init__(self, model: nn.Module, config: Optional[EWCConfig] = None):
        self.model = model
        self.config = config or EWCConfig()
        if not isinstance(self.config, EWCConfig):
            raise TypeError(f"config must be an EWCConfig, got {type(self.config).__name__}")
        self.terms: list[_Term] = []

    def consolidate(self, loader: Optional[Iterable[dict]] = None, *, fisher: Optional[dict[str, Tensor]] = None,
                    loss_fn: Callable[[nn.Module, dict], Tensor] = default_loss) -> None:
        """End of a task: estimate the Fisher on `loader` (or take `fisher`, {name: tensor shaped like the
        parameter}) and anchor the current values of the parameters that require grad."""
        c = self.config
        if (loader is None) == (fisher is None):
            raise ValueError("give either loader (to estimate the Fisher) or fisher, not both or neither")
        if fisher is None:
            fisher = estimate_fisher(self.model, loader, kind=c.fisher, loss_fn=loss_fn, max_batches=c.max_batches,
                                     progress=c.progress)
        named = dict(self.model.named_parameters())
        names = [n for n, p in named.items() if p.requires_grad]
        for n, f in fisher.items():
            if n not in named:
                raise ValueError(f"fisher: {n!r} is not a parameter of the model")
            if f.shape != named[n].shape:
                raise ValueError(f"fisher[{n!r}] must have its parameter's shape {tuple(named[n].shape)}, "
                                 f"got {tuple(f.shape)}")
        missing = [n for n in names if n not in fisher]
        if missing:
            raise ValueError(f"fisher has no entry for the trainable parameter(s) {missing[:3]}")
        with torch.no_grad():
            store = [fisher[n].detach().to(c.storage_dtype, memory_format=torch.contiguous_format, copy=True)
                     for n in names]
            anchor = [named[n].detach().to(c.storage_dtype, memory_format=torch.contiguous_format, copy=True)
                      for n in names]
            if c.mode == "online" and self.terms:
                old = self.terms[0]
                if old.names != names:
                    raise ValueError("online EWC needs the same trainable parameters at every consolidation; "
                                     "use mode='separate' when they change (e.g. a new adapter per task)")
                for new, previous in zip(store, old.fisher):
                    new.add_(previous, alpha=c.decay)
                self.terms = []
        self.terms.append(_Term(names, [named[n] for n in names], store, anchor))

    def apply_(self, scale: float = 1.0) -> Tensor:
        """After backward: add scale * lam * F * (theta - theta*) of every term into the parameters' .grad (created
        as zeros where None) and return scale * the penalty (0-d, fp32 or fp64 for fp64 parameters, on their
        device; 0 before the first consolidation)."""
        total = None
        lam = self.config.lam * scale
        for term in self.terms:
            for p in term.params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            value = ewc_penalty_(term.params, [p.grad for p in term.params], term.fisher, term.anchor, lam)
            total = value if total is None else total + value  # on the parameters' device: no sync
        return total if total is not None else torch.zeros(())

    def state_dict(self) -> dict:
        """The terms (names, Fisher, anchors) for a checkpoint."""
        return {"terms": [{"names": t.names, "fisher": t.fisher, "anchor": t.anchor} for t in self.terms]}

    def load_state_dict(self, state: dict) -> None:
        named = dict(self.model.named_parameters())
        terms = []
        for term in state["terms"]:
            unknown = [n for n in term["names"] if n not in named]
            if unknown:
                raise ValueError(f"state: parameter(s) {unknown[:3]} are not in the model")
            terms.append(_Term(list(term["names"]), [named[n] for n in term["names"]], list(term["fisher"]),
                               list(term["anchor"])))
        self.terms = terms


class EWCTrainer(Trainer):
    """transformers Trainer that adds EWC's penalty gradient after each backward (scaled by 1 / gradient
    accumulation steps, so once per optimizer step) and the penalty to the logged loss. Not with fp16 loss scaling
    (the gradients are scaled then); bf16 and fp32 are fine."""

    def __init__(self, *args, ewc: EWC, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(ewc, EWC):
            raise TypeError(f"ewc must be a fastft EWC, got {type(ewc).__name__}")
        if self.args.fp16:
            raise ValueError("EWCTrainer does not support fp16 loss scaling (args.fp16); use bf16 or fp32")
        self.ewc = ewc

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        penalty = self.ewc.apply_(1.0 / self.args.gradient_accumulation_steps)
        return loss + penalty.to(loss.device, loss.dtype)
