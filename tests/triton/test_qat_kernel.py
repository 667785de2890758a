"""kernels/qat.py under the Triton interpreter: bit-exact with the reference (and so with torchao), forward and
backward, every dtype."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1, set before triton is imported",
                allow_module_level=True)

from fastft.ops import use_backend  # noqa: E402
from fastft.qat import fake_quantize  # noqa: E402


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("config", (dict(group_size=32), dict(group_size=48), dict(granularity="per_channel"),
                                    dict(granularity="per_token", symmetric=False),
                                    dict(group_size=32, symmetric=False),
                                    dict(granularity="per_channel", symmetric=False)))
def test_kernel_is_bit_exact(dtype, bits, config):
    g = torch.Generator().manual_seed(bits)
    x = (torch.randn(21, 96, generator=g) * 3).to(dtype)
    x[0] = 0.0  # all-zero groups: the scale clamps at eps
    x[1] = x[1].abs()
    grad = torch.randn(21, 96, generator=g).to(dtype)
    results = {}
    for backend in ("triton", "reference"):
        leaf = x.clone().requires_grad_()
        with use_backend(backend):
            out = fake_quantize(leaf, bits, **config)
            (dx,) = torch.autograd.grad(out, [leaf], grad)
        results[backend] = (out, dx)
    assert torch.equal(results["triton"][0], results["reference"][0])
    assert torch.equal(results["triton"][1], results["reference"][1])


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("bits,group_size", ((4, 32), (8, 48), (2, 96)))
@pytest.mark.parametrize("symmetric", (True, False))
def test_learned_scale_kernel_matches_reference(dtype, bits, group_size, symmetric):
    """Forward and dx bit-exact with the reference formulas (torchao's); d(scale) and d(zero point) are
    differences of fp32 sums taken in another order, so they agree to fp32 rounding of the terms' magnitudes (the
    zero point's second sum is rounded to x's dtype: up to one unit in its last place more)."""
    from fastft.qat import fake_quantize_with_scale, initial_qparams

    g = torch.Generator().manual_seed(bits + group_size)
    x = (torch.randn(21, 96, generator=g) * 3 + (0.0 if symmetric else 0.5)).to(dtype)
    scale, zero_point = initial_qparams(x, bits, group_size, symmetric)
    scale = scale * torch.empty(scale.shape).uniform_(0.6, 1.4, generator=g)  # as after some training
    if zero_point is not None:
        zero_point = zero_point + torch.empty(scale.shape).uniform_(-1.5, 1.5, generator=g)
    grad = torch.randn(21, 96, generator=g).to(dtype)
    results = {}
    for backend in ("triton", "reference"):
        leaf, leaf_scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
        params = [leaf, leaf_scale]
        leaf_zero_point = None
        if zero_point is not None:
            leaf_zero_point = zero_point.clone().requires_grad_()
            params.append(leaf_zero_point)
        with use_backend(backend):
            out = fake_quantize_with_scale(leaf, leaf_scale, bits, group_size, zero_point=leaf_zero_point)
            results[backend] = (out, *torch.autograd.grad(out, params, grad))
    ours, theirs = results["triton"], results["reference"]
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert ours[2].dtype == torch.float32 and ours[2].shape == scale.shape
    assert (ours[2] - theirs[2]).abs().max() <= 1e-5 * theirs[2].abs().max()
    if zero_point is not None:
        p = (grad.float().reshape(-1, group_size) * scale.reshape(-1, 1)).to(dtype).float()
        tolerance = (p.abs().sum(-1) * 1e-6 + p.sum(-1).abs() * torch.finfo(dtype).eps).reshape(scale.shape)
        assert torch.all((ours[3] - theirs[3]).abs() <= tolerance)
