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
def test_learned_scale_kernel_matches_reference(dtype, bits, group_size):
    """Forward and dx bit-exact with the reference formulas (torchao's); d(scale) is a difference of fp32 sums
    taken in another order, so it agrees to fp32 rounding."""
    from fastft.qat import fake_quantize_with_scale, initial_scales

    g = torch.Generator().manual_seed(bits + group_size)
    x = (torch.randn(21, 96, generator=g) * 3).to(dtype)
    scale = initial_scales(x, bits, group_size)
    scale = scale * torch.empty(scale.shape).uniform_(0.6, 1.4, generator=g)  # as after some training
    grad = torch.randn(21, 96, generator=g).to(dtype)
    results = {}
    for backend in ("triton", "reference"):
        leaf, leaf_scale = x.clone().requires_grad_(), scale.clone().requires_grad_()
        with use_backend(backend):
            out = fake_quantize_with_scale(leaf, leaf_scale, bits, group_size)
            results[backend] = (out, *torch.autograd.grad(out, [leaf, leaf_scale], grad))
    ours, theirs = results["triton"], results["reference"]
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])
    assert ours[2].dtype == torch.float32 and ours[2].shape == scale.shape
    assert (ours[2] - theirs[2]).abs().max() <= 1e-5 * theirs[2].abs().max()


@pytest.mark.parametrize("dtype, tolerance", ((torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 1e-2)))
@pytest.mark.parametrize("activation_bits, quantize_weight", ((8, True), (0, True), (4, False)))
def test_fused_fake_quant_linear_kernels(dtype, tolerance, activation_bits, quantize_weight):
    """The GEMMs with fake quantization in their prologues and the straight-through masks in their epilogues vs the
    reference op (fake-quantized operands written out, then torch matmuls): equal up to the GEMMs' summation
    order, with every fake-quantized value and mask the same."""
    from conftest import rel_error
    from fastft.ops import qat as qat_ops

    for rows, out_features, in_features in ((37, 40, 96), (3, 70, 160)):
        g = torch.Generator().manual_seed(rows)
        x = (torch.randn(rows, in_features, generator=g) * 2).to(dtype)
        weight = torch.randn(out_features, in_features, generator=g).to(dtype)
        bias = torch.randn(out_features, generator=g).to(dtype)
        grad = torch.randn(rows, out_features, generator=g).to(dtype)
        results = {}
        for backend in ("triton", "reference"):
            leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
            with use_backend(backend):
                out = qat_ops.fake_quant_linear(*leaves, 4, 32, activation_bits, quantize_weight)
                results[backend] = (out, *torch.autograd.grad(out, leaves, grad))
        for ours, theirs in zip(results["triton"], results["reference"]):
            assert ours.dtype == dtype and rel_error(ours, theirs) < tolerance
