import os

import pytest
import torch

from fastft.ops import use_backend

# FASTFT_TEST_DEVICE=cuda (bench/gpu_check.sh): tensors the tests create without a device are CUDA tensors, so the
# Triton tests (tests/ops, marked triton_interpreter) compare the compiled kernels on the GPU with the reference.
TEST_DEVICE = os.environ.get("FASTFT_TEST_DEVICE", "cpu")
if TEST_DEVICE != "cpu":
    torch.set_default_device(TEST_DEVICE)


def assert_gemm_close(actual: torch.Tensor, a: torch.Tensor, b: torch.Tensor, unit: float, extra=None) -> None:
    """actual ~ a @ b elementwise within the bound of a GEMM whose products carry at most `unit` relative error
    (TF32: 2^-10 (1 + 2^-12); TF32x3: 3 * 2^-22 plus its 3 K accumulation roundings, see kernels/common.py) and whose
    K-term fp32 sums add at most K * 2^-23 (truncating accumulation): |actual - a @ b| <= (unit + K 2^-23) *
    (|a| @ |b|) (+ extra), computed in fp64. Two-sided; NaN fails."""
    a64, b64 = a.double(), b.double()
    error = (actual.double() - a64 @ b64).abs()
    bound = (unit + a.shape[-1] * 2.0 ** -23) * (a64.abs() @ b64.abs()) + (0 if extra is None else extra)
    assert not torch.isnan(actual).any()
    assert bool((error <= bound).all()), float((error - bound).max())

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


def causal_lm_losses(model, batch, steps: int, lr: float = 1e-3, optimizer=None) -> list[float]:
    """Per-step losses of `steps` optimizer steps (a new AdamW at `lr`, or `optimizer` carried across calls) on a
    causal LM over batch(step) (labels = inputs)."""
    if optimizer is None:
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


def bnb_standard_layout(model: torch.nn.Module) -> torch.nn.Module:
    """Keep the bitsandbytes Linear4bit layers of `model` (an oracle in a test) on bitsandbytes' standard 4-bit
    layout on every CPU. On AVX512_BF16 CPUs its forward otherwise repacks the weight for its own CPU kernel (absmax
    rounded to bf16) in eval mode without gradients, so its outputs would depend on the machine. The repacked
    layout is tested on its own, by calling bitsandbytes' conversion directly (tests/nn/test_nf4_linear.py,
    tests/integrations/test_qlora_patch.py)."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def repack_for_bnb_cpu_kernel(model: torch.nn.Module) -> int:
    """Convert every bitsandbytes Linear4bit weight of `model` to bitsandbytes' CPU-kernel layout, as its eval-mode
    forward does on AVX512_BF16 CPUs, on any CPU; returns how many."""
    import bitsandbytes as bnb
    from bitsandbytes.functional import _convert_weight_packed_for_cpu

    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            weight = module.weight
            weight.data, weight.quant_state = _convert_weight_packed_for_cpu(weight.data, weight.quant_state)
            count += 1
    return count


NAN, INF = float("nan"), float("inf")


def assert_same_values(ours, theirs):
    """NaN exactly where theirs is NaN, every other value (infinities included) equal."""
    assert ours.shape == theirs.shape and ours.dtype == theirs.dtype
    nan = theirs.isnan()
    assert torch.equal(ours.isnan(), nan), f"{int(ours.isnan().sum())} NaN vs {int(nan.sum())}"
    assert torch.equal(torch.where(nan, 0, ours), torch.where(nan, 0, theirs))


def with_specials(rows, cols, dtype, seed=0):
    """Random (rows, cols) x and dy, x with NaN, +inf and -inf first, in the middle and last in a row (a SIMD body
    and a scalar tail of a group), NaN with inf and +inf with -inf in one group, and clean rows from row 7 on."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, cols, generator=g) * 2 + 0.3).to(dtype)
    x[0, 0] = NAN
    x[1, cols - 1] = NAN
    x[2, 1] = INF
    x[3, cols - 2] = -INF
    x[4, 5], x[4, 6] = NAN, INF
    x[5, 3], x[5, 4] = INF, -INF
    x[6, cols // 2 + 1] = -INF
    return x, torch.randn(rows, cols, generator=g).to(dtype)
