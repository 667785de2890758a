import pytest
import torch

from fastft.ops import use_backend

CPU_BACKENDS = ("native", "reference")


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, computed in fp64; NaN anywhere gives inf, empty vs empty 0."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if expected.numel() == 0:  # nothing to compare: equal when both are empty
        return 0.0 if actual.numel() == 0 else float("inf")
    if torch.isnan(actual).any() or torch.isnan(expected).any():
        return float("inf")
    scale = expected.abs().max().clamp(min=1e-30)
    return float((actual - expected).abs().max() / scale)


TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def causal_lm_losses(model, batch, steps: int, lr: float = 1e-3) -> list[float]:
    """Per-step losses of `steps` AdamW steps on a causal LM over batch(step) (labels = inputs)."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses = []
    for step in range(steps):
        ids = batch(step)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.fixture(params=CPU_BACKENDS)
def backend(request):
    with use_backend(request.param):
        yield request.param


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
