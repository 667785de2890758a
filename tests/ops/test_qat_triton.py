"""kernels/qat.py under the Triton interpreter: bit-exact with the reference (and so with torchao), forward and
backward, every dtype."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from conftest import INF, NAN, assert_same_values, with_specials  # noqa: E402
from fastft.ops import use_backend  # noqa: E402
from fastft.qat import fake_quantize  # noqa: E402


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("config", (dict(group_size=32), dict(group_size=48), dict(granularity="per_channel"),
                                    dict(granularity="per_token", symmetric=False),
                                    dict(group_size=32, symmetric=False),
                                    dict(granularity="per_channel", symmetric=False)))
def test_kernel_is_bit_exact(dtype, bits, config):
    g = torch.Generator(torch.get_default_device()).manual_seed(bits)
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
@pytest.mark.parametrize("bits,group", ((4, 32), (8, 48), (2, 96)))
@pytest.mark.parametrize("symmetric", (True, False))
def test_qparams_kernel_is_bit_exact(dtype, bits, group, symmetric):
    """The dynamic scales and zero points (fastft.qat.initial_qparams' source) equal the reference's."""
    from fastft.ops.qat import qparams

    g = torch.Generator(torch.get_default_device()).manual_seed(bits + group)
    x = (torch.randn(21, 96, generator=g) * 3).to(dtype)
    x[0] = 0.0  # all-zero groups: the scale clamps at eps
    x[1] = x[1].abs() + 1.0  # groups away from zero
    results = {}
    for backend in ("triton", "reference"):
        with use_backend(backend):
            results[backend] = qparams(x, bits, group, symmetric)
    for got, want in zip(results["triton"], results["reference"]):
        assert got.shape == want.shape == (x.numel() // group, 1) and got.dtype == want.dtype == torch.float32
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("bits,group_size", ((4, 32), (8, 48), (2, 96)))
@pytest.mark.parametrize("symmetric", (True, False))
def test_learned_scale_kernel_matches_reference(dtype, bits, group_size, symmetric):
    """Forward and dx bit-exact with the reference formulas (torchao's); d(scale) and d(zero point) are
    differences of fp32 sums taken in another order, so they agree to fp32 rounding of the terms' magnitudes (the
    zero point's second sum is rounded to x's dtype: up to one unit in its last place more)."""
    from fastft.qat import fake_quantize_with_scale, initial_qparams

    g = torch.Generator(torch.get_default_device()).manual_seed(bits + group_size)
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


# numpy, which runs the interpreted kernels, warns about arithmetic on NaN and inf (and 1 / 0): what these tests feed
IGNORE_NAN_WARNINGS = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning",
                                                 "ignore:divide by zero encountered:RuntimeWarning")


def _torchao(x, bits, **config):
    qat = pytest.importorskip("torchao.quantization.qat")
    return qat.IntxFakeQuantizer(qat.IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"), **config))(x)


def _torchao_affine(x, bits, group_size):
    """torchao's asymmetric affine primitives on blocks of (1, group_size) (fastft's asymmetric per-group)."""
    from torchao.quantization.quant_primitives import MappingType, _fake_quantize_affine, choose_qparams_affine

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale, zero_point = choose_qparams_affine(x.detach(), MappingType.ASYMMETRIC, (1, group_size),
                                              getattr(torch, f"int{bits}"), qmin, qmax, None, torch.float32,
                                              torch.int32)
    return _fake_quantize_affine(x, (1, group_size), scale, zero_point, torch.int32, qmin, qmax)


NAN_CONFIGS = {  # name: (cols, torchao's fake quantization, fastft's arguments)
    "per_group_32": (96, lambda t: _torchao(t, 4, group_size=32, is_symmetric=True), dict(bits=4, group_size=32)),
    "per_group_48": (96, lambda t: _torchao(t, 3, group_size=48, is_symmetric=True), dict(bits=3, group_size=48)),
    "per_channel": (100, lambda t: _torchao(t, 8, granularity="per_channel", is_symmetric=True),
                    dict(bits=8, granularity="per_channel")),
    "per_token": (77, lambda t: _torchao(t, 8, granularity="per_token", is_symmetric=False),
                  dict(bits=8, granularity="per_token", symmetric=False)),
    "per_group_asymmetric": (96, lambda t: _torchao_affine(t, 4, 32), dict(bits=4, group_size=32, symmetric=False)),
}


@IGNORE_NAN_WARNINGS
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("config", NAN_CONFIGS)
def test_kernel_propagates_nan_and_inf_like_torchao(dtype, config):
    """The Triton pass keeps torchao's NaN: a NaN makes its whole group NaN (outputs and dx), an infinity makes the
    scale inf; the asymmetric zero point of a group with -inf is NaN through the device's int32 conversion, as
    torch's cast (here the interpreter on this CPU, as torchao on this CPU)."""
    cols, theirs_fn, ours_args = NAN_CONFIGS[config]
    x, grad = with_specials(10, cols, dtype)
    results = []
    for run in (theirs_fn, lambda t: fake_quantize(t, **ours_args)):
        leaf = x.clone().requires_grad_()
        with use_backend("triton"):
            out = run(leaf)
            results.append((out, *torch.autograd.grad(out, [leaf], grad)))
    (out, dx), (their_out, their_dx) = results
    assert_same_values(out, their_out)
    assert_same_values(dx, their_dx)
    assert out[:7].isnan().any() and not out[7:].isnan().any()


@IGNORE_NAN_WARNINGS
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_all_zero_group_with_eps_zero_is_nan_like_torchao(dtype):
    """eps=0 lets an all-zero group's scale be 0, so 1 / scale is inf: NaN outputs and gradients in torchao."""
    x = torch.randn(3, 64).to(dtype)
    x[1, :32] = 0.0
    grad = torch.randn(3, 64).to(dtype)
    results = []
    for run in (lambda t: _torchao(t, 4, group_size=32, is_symmetric=True, eps=0.0),
                lambda t: fake_quantize(t, 4, 32, eps=0.0)):
        leaf = x.clone().requires_grad_()
        with use_backend("triton"):
            out = run(leaf)
            results.append((out, *torch.autograd.grad(out, [leaf], grad)))
    (out, dx), (their_out, their_dx) = results
    assert their_dx[1, :32].isnan().all()
    assert_same_values(out, their_out)
    assert_same_values(dx, their_dx)


@IGNORE_NAN_WARNINGS
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("symmetric", (True, False))
def test_learned_scale_kernel_propagates_nan_like_the_reference(dtype, symmetric):
    """Given scales: NaN exactly where x is NaN, +-inf clamped, dx equal to the reference's, d(scale) NaN for the
    same groups (those holding NaN or inf)."""
    from fastft.qat import fake_quantize_with_scale, initial_qparams

    x, grad = with_specials(10, 96, dtype)
    scale, zero_point = initial_qparams(torch.where(x.isfinite(), x, 1.0), 4, 32, symmetric)
    results = {}
    for backend in ("triton", "reference"):
        params = [x.clone().requires_grad_(), scale.clone().requires_grad_()]
        if zero_point is not None:
            params.append((zero_point + 0.3).requires_grad_())
        with use_backend(backend):
            out = fake_quantize_with_scale(params[0], params[1], 4, 32, zero_point=params[2] if len(params) > 2
                                           else None)
            results[backend] = (out, *torch.autograd.grad(out, params, grad))
    ours, theirs = results["triton"], results["reference"]
    assert_same_values(ours[0], theirs[0])
    assert torch.equal(ours[0].isnan(), x.isnan())
    assert_same_values(ours[1], theirs[1])
    assert theirs[2].isnan().any()
    for our_grad, their_grad in zip(ours[2:], theirs[2:]):
        nan = their_grad.isnan()
        assert torch.equal(our_grad.isnan(), nan)
        assert (our_grad[~nan] - their_grad[~nan]).abs().max() <= 1e-5 * their_grad[~nan].abs().max() + 1e-6


@IGNORE_NAN_WARNINGS
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("where", ("weight", "input"))
def test_fused_fake_quant_linear_propagates_nan_like_the_reference(dtype, where):
    """fastft::fake_quant_linear on Triton (fake quantization inside the GEMM tiles, straight-through masks in the
    epilogues) gives NaN at the reference's places; the finite values agree up to the GEMMs' summation order."""
    from fastft.ops import qat as qat_ops

    x, _ = with_specials(10, 96, dtype)
    g = torch.Generator(torch.get_default_device()).manual_seed(1)
    weight = torch.randn(40, 96, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    if where == "weight":
        weight[3, 40] = NAN  # one weight group NaN
        weight[7, 70] = INF  # a symmetric group with inf: NaN
        x = torch.where(x.isfinite(), x, 0.5)
    grad = torch.randn(10, 40, generator=g).to(dtype)
    results = {}
    for backend in ("triton", "reference"):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        with use_backend(backend):
            out = qat_ops.fake_quant_linear(*leaves, 4, 32, 8, True)
            results[backend] = (out, *torch.autograd.grad(out, leaves, grad))
    tolerance = 1e-5 if dtype == torch.float32 else 1e-2
    for ours, theirs in zip(results["triton"], results["reference"]):
        nan = theirs.isnan()
        assert torch.equal(ours.isnan(), nan)
        assert torch.equal(ours.isinf(), theirs.isinf()) and torch.equal(ours[ours.isinf()], theirs[theirs.isinf()])
        finite = theirs.isfinite()
        if finite.any():
            scale = theirs[finite].double().abs().max()
            assert (ours[finite].double() - theirs[finite].double()).abs().max() <= tolerance * scale
    out = results["triton"][0]
    assert out.isnan().any() and not out.isnan().all()
