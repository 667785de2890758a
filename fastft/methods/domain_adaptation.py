"""Domain-adversarial fine-tuning (DANN, Ganin et al. 2016) of a transformers model, with domain-specific adapters.

    classifier = DomainClassifier(model.config.hidden_size)
    config = DANNConfig(domain_weight=0.1)
    for step, (source, target) in enumerate(zip(source_loader, target_loader)):
        out = dann_step(model, classifier, source, target, progress=step / total_steps, config=config)
        out.loss.backward(); optimizer.step(); optimizer.zero_grad()

The task loss comes from the labelled source batch; the domain loss is the cross-entropy of the classifier telling
source (domain 0) from target (domain 1) on the mean-pooled last hidden states, through gradient reversal whose
strength follows the DANN schedule lam_p = 2 / (1 + exp(-gamma p)) - 1 (times lam_max), so the model learns
features the classifier cannot separate. With `domain_adapters` (a bottleneck adapter per domain, fastft.adapters),
each batch runs through its own domain's adapter stacked with the shared ones (`use_domain`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastft.domain import dann_lambda
from fastft.methods import adapters as bottleneck
from fastft.nn.domain import DomainClassifier


@dataclass
class DANNConfig:
    """domain_weight: weight of the domain loss in the total; lam_max and gamma: the reversal schedule
    lam_max * (2 / (1 + exp(-gamma p)) - 1); source_domain / target_domain: their domain adapters' names (None:
    no domain adapters); shared_adapters: adapters run after the domain's own, in every batch."""

    domain_weight: float = 1.0
    lam_max: float = 1.0
    gamma: float = 10.0
    source_domain: Optional[str] = None
    target_domain: Optional[str] = None
    shared_adapters: Sequence[str] = ()

    def __post_init__(self):
        for name in ("domain_weight", "lam_max", "gamma"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ValueError(f"{name} must be a real number >= 0, got {value!r}")
        if (self.source_domain is None) != (self.target_domain is None):
            raise ValueError("source_domain and target_domain are both adapter names or both None")


class DANNOutput(NamedTuple):
    loss: Tensor  # task loss + domain_weight * domain loss
    task_loss: Tensor
    domain_loss: Tensor
    domain_accuracy: float
    lam: float


def use_domain(model: nn.Module, domain: Optional[str], shared: Sequence[str] = ()) -> None:
    """Run `domain`'s bottleneck adapter followed by the `shared` ones (None: the shared ones only)."""
    bottleneck.set_active(model, ([domain] if domain is not None else []) + list(shared))


def _hidden(model: nn.Module, batch: dict, with_labels: bool):
    inputs = {k: v for k, v in batch.items() if with_labels or k != "labels"}
    outputs = model(**inputs, output_hidden_states=True)
    return outputs, outputs.hidden_states[-1]


def dann_step(model: nn.Module, classifier: DomainClassifier, source: dict, target: dict, progress: float,
              config: Optional[DANNConfig] = None) -> DANNOutput:
    """One DANN training step's losses (the caller runs backward and the optimizer): the task loss of the source
    batch (it must carry labels) and the domain loss over the source and target batches, the classifier behind
    gradient reversal at strength lam_max * dann_lambda(progress, gamma)."""
    config = config or DANNConfig()
    if "labels" not in source:
        raise ValueError("source batch must carry labels (the task loss is computed on it)")
    lam = config.lam_max * dann_lambda(progress, config.gamma)
    classifier.reversal.lam = lam
    if config.source_domain is not None:
        use_domain(model, config.source_domain, config.shared_adapters)
    source_out, source_hidden = _hidden(model, source, True)
    if config.target_domain is not None:
        use_domain(model, config.target_domain, config.shared_adapters)
    _, target_hidden = _hidden(model, target, False)
    logits = torch.cat([classifier(source_hidden, source.get("attention_mask")),
                        classifier(target_hidden, target.get("attention_mask"))])
    domains = torch.cat([torch.zeros(source_hidden.shape[0], dtype=torch.long),
                         torch.ones(target_hidden.shape[0], dtype=torch.long)]).to(logits.device)
    domain_loss = F.cross_entropy(logits.float(), domains)
    accuracy = float((logits.argmax(-1) == domains).float().mean())
    task_loss = source_out.loss
    return DANNOutput(task_loss + config.domain_weight * domain_loss, task_loss, domain_loss, accuracy, lam)
