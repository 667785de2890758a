"""fastft.qat.fake_quantize against torchao's own IntxFakeQuantizer: bit-exact outputs and gradients."""

import itertools
import re

import pytest
import torch

from conftest import INF, NAN, assert_same_values, with_specials
from fastft.ops import qat as qat_ops
from fastft.qat import fake_quantize

torchao_qat = pytest.importorskip("torchao.quantization.qat")

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def torchao_fake_quantize(x, bits, **config):
    quantizer = torchao_qat.IntxFakeQuantizer(torchao_qat.IntxFakeQuantizeConfig(getattr(torch, f"int{bits}"),
                                                                                  **config))
    return quantizer(x)


def outputs_and_grads(fn, x, grad):
    x = x.detach().requires_grad_()
    out = fn(x)
    (dx,) = torch.autograd.grad(out, [x], grad)
    return out, dx


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("group_size", (32, 64, 160))
def test_per_group_symmetric_is_bit_exact(backend, dtype, bits, group_size):
    g = torch.Generator().manual_seed(bits * 1000 + group_size)
    x = (torch.randn(37, 320, generator=g) * 3).to(dtype)
    x[0, :group_size] = 0.0  # an all-zero group: the scale clamps at eps
    grad = torch.randn(37, 320, generator=g).to(dtype)
    theirs = outputs_and_grads(lambda t: torchao_fake_quantize(t, bits, group_size=group_size, is_symmetric=True),
                               x, grad)
    ours = outputs_and_grads(lambda t: fake_quantize(t, bits, group_size), x, grad)
    assert ours[0].dtype == dtype
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_per_channel_symmetric_is_bit_exact(backend, dtype, bits):
    x = (torch.randn(29, 100) * 2).to(dtype)
    grad = torch.randn(29, 100).to(dtype)
    theirs = outputs_and_grads(lambda t: torchao_fake_quantize(t, bits, granularity="per_channel",
                                                               is_symmetric=True), x, grad)
    ours = outputs_and_grads(lambda t: fake_quantize(t, bits, granularity="per_channel"), x, grad)
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (2, 4, 8))
@pytest.mark.parametrize("shape", ((5, 77), (2, 9, 130), (1, 1, 3)))
def test_per_token_asymmetric_is_bit_exact(backend, dtype, bits, shape):
    x = (torch.randn(*shape) * 2 + 0.5).to(dtype)
    x.view(-1, shape[-1])[0] = x.view(-1, shape[-1])[0].abs()  # an all-positive token: zero point at qmin
    grad = torch.randn(*shape).to(dtype)
    theirs = outputs_and_grads(lambda t: torchao_fake_quantize(t, bits, granularity="per_token",
                                                               is_symmetric=False), x, grad)
    ours = outputs_and_grads(lambda t: fake_quantize(t, bits, granularity="per_token", symmetric=False), x, grad)
    assert ours[0].shape == x.shape
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


def torchao_affine_fake_quantize(x, bits, group_size):
    """torchao's affine primitives, asymmetric, on blocks of (1, group_size): what fastft's asymmetric per-group
    fake quantization equals (its IntxFakeQuantizer uses other qparams for that config, see fastft.reference.qat)."""
    from torchao.quantization.quant_primitives import MappingType, _fake_quantize_affine, choose_qparams_affine

    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    rows = x.reshape(-1, x.shape[-1])
    scale, zero_point = choose_qparams_affine(rows.detach(), MappingType.ASYMMETRIC, (1, group_size),
                                              getattr(torch, f"int{bits}"), qmin, qmax, None, torch.float32,
                                              torch.int32)
    return _fake_quantize_affine(rows, (1, group_size), scale, zero_point, torch.int32, qmin, qmax).reshape(x.shape)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits", (2, 3, 4, 8))
@pytest.mark.parametrize("granularity,group_size", (("per_group", 32), ("per_group", 160), ("per_channel", 320)))
def test_per_group_asymmetric_is_bit_exact_with_torchao_affine_primitives(backend, dtype, bits, granularity,
                                                                          group_size):
    g = torch.Generator().manual_seed(bits * 10 + group_size)
    x = (torch.randn(3, 11, 320, generator=g) * 2 + 0.5).to(dtype)
    x[0, 0] = x[0, 0].abs() + 1.0  # groups above zero: the zero point clamps at qmin
    x[0, 1] = -x[0, 1].abs() - 1.0  # groups below zero
    x[0, 2] = 0.0  # all-zero groups: the scale clamps at eps
    grad = torch.randn(3, 11, 320, generator=g).to(dtype)
    theirs = outputs_and_grads(lambda t: torchao_affine_fake_quantize(t, bits, group_size), x, grad)
    ours = outputs_and_grads(lambda t: fake_quantize(t, bits, group_size, symmetric=False,
                                                     granularity=granularity), x, grad)
    assert ours[0].dtype == dtype and ours[0].shape == x.shape
    assert torch.equal(ours[0], theirs[0]) and torch.equal(ours[1], theirs[1])


NAN_CONFIGS = {  # name: (cols, torchao's fake quantization, fastft's)
    "per_group_32": (96, lambda t: torchao_fake_quantize(t, 4, group_size=32, is_symmetric=True),
                     lambda t: fake_quantize(t, 4, 32)),
    "per_group_36": (108, lambda t: torchao_fake_quantize(t, 3, group_size=36, is_symmetric=True),
                     lambda t: fake_quantize(t, 3, 36)),
    "per_channel": (100, lambda t: torchao_fake_quantize(t, 8, granularity="per_channel", is_symmetric=True),
                    lambda t: fake_quantize(t, 8, granularity="per_channel")),
    "per_token": (77, lambda t: torchao_fake_quantize(t, 8, granularity="per_token", is_symmetric=False),
                  lambda t: fake_quantize(t, 8, granularity="per_token", symmetric=False)),
    "per_group_asymmetric": (96, lambda t: torchao_affine_fake_quantize(t, 4, 32),
                             lambda t: fake_quantize(t, 4, 32, symmetric=False)),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", NAN_CONFIGS)
def test_nan_and_inf_propagate_as_in_torchao(backend, dtype, config):
    """torchao's min / max / clamp keep NaN: a NaN makes its whole group NaN, forward and backward; an infinity
    makes the scale inf, so the group NaN (symmetric) or +inf (asymmetric with -inf, whose zero point is a NaN cast
    to int32). fastft gives the same values, NaN at the same places."""
    cols, theirs_fn, ours_fn = NAN_CONFIGS[config]
    x, grad = with_specials(10, cols, dtype)
    theirs = outputs_and_grads(theirs_fn, x, grad)
    ours = outputs_and_grads(ours_fn, x, grad)
    assert_same_values(ours[0], theirs[0])
    assert_same_values(ours[1], theirs[1])
    assert not ours[0][7:].isnan().any() and not ours[1][7:].isnan().any()  # clean rows stay clean


@pytest.mark.parametrize("dtype", DTYPES)
def test_one_nan_makes_its_whole_group_nan(backend, dtype):
    x = torch.randn(4, 128).to(dtype)
    x[1, 40] = NAN  # group 1 of row 1
    x = x.requires_grad_()
    out = fake_quantize(x, 4, 32)
    (dx,) = torch.autograd.grad(out, [x], torch.ones_like(out))
    expected = torch.zeros(4, 128, dtype=torch.bool)
    expected[1, 32:64] = True
    assert torch.equal(out.isnan(), expected) and torch.equal(dx.isnan(), expected)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_all_zero_group_with_eps_zero_is_nan_as_in_torchao(backend, dtype):
    """eps=0 lets an all-zero group's scale be 0: 0 * (1 / 0) is NaN in torchao's forward and backward."""
    x = torch.randn(3, 64).to(dtype)
    x[1, :32] = 0.0
    grad = torch.randn(3, 64).to(dtype)
    theirs = outputs_and_grads(lambda t: torchao_fake_quantize(t, 4, group_size=32, is_symmetric=True, eps=0.0), x,
                               grad)
    ours = outputs_and_grads(lambda t: fake_quantize(t, 4, 32, eps=0.0), x, grad)
    assert theirs[0][1, :32].isnan().all() and theirs[1][1, :32].isnan().all()
    assert_same_values(ours[0], theirs[0])
    assert_same_values(ours[1], theirs[1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("symmetric", (True, False))
def test_learned_scales_propagate_nan_and_inf_as_torchao_range_learning(backend, dtype, symmetric):
    """Given scales: NaN only where x is NaN (+-inf clamps to the range's end), dx 0 there, and torchao's NaN
    d(scale) for groups holding NaN or inf (its 0 * x term); d(zero point) finite; other values equal (the sums up
    to their order)."""
    from fastft.qat import fake_quantize_with_scale, initial_qparams

    x, grad = with_specials(10, 108, dtype)
    finite = torch.where(x.isfinite(), x, 1.0)
    scale, zero_point = initial_qparams(finite, 4, 36, symmetric)
    config = dict(group_size=36, is_symmetric=symmetric, is_dynamic=False, range_learning=True)
    if not symmetric:
        config["zero_point_precision"] = torch.float32
    quantizer = torchao_qat.IntxFakeQuantizer(torchao_qat.IntxFakeQuantizeConfig(torch.int4, **config))
    quantizer._initialized = True
    quantizer(finite)
    with torch.no_grad():
        quantizer.scale.copy_(scale * 0.8)
        if not symmetric:
            quantizer.zero_point.copy_(zero_point + 0.3)
    their_params = [quantizer.scale] + ([] if symmetric else [quantizer.zero_point])
    our_params = [p.detach().clone().requires_grad_() for p in their_params]
    x_theirs, x_ours = x.clone().requires_grad_(), x.clone().requires_grad_()
    theirs = quantizer(x_theirs)
    their_grads = torch.autograd.grad(theirs, [x_theirs, *their_params], grad)
    ours = fake_quantize_with_scale(x_ours, our_params[0], 4, 36, zero_point=None if symmetric else our_params[1])
    our_grads = torch.autograd.grad(ours, [x_ours, *our_params], grad)
    assert_same_values(ours, theirs)
    assert torch.equal(ours.isnan(), x.isnan())
    assert_same_values(our_grads[0], their_grads[0])
    assert their_grads[1].isnan().any()  # d(scale); d(zero point) sums p and stays finite
    for our_grad, their_grad in zip(our_grads[1:], their_grads[1:]):
        nan = their_grad.isnan()
        assert torch.equal(our_grad.isnan(), nan)
        assert (our_grad[~nan] - their_grad[~nan]).abs().max() <= 1e-5 * their_grad[~nan].abs().max() + 1e-6


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("where", ("weight", "input"))
@pytest.mark.parametrize("trainable", (True, False))
def test_fake_quant_linear_propagates_nan_and_inf_as_torchao(backend, dtype, where, trainable):
    """FakeQuantLinear (int4 g32 weights, int8 per-token activations) against torchao's FakeQuantizedLinear with
    NaN / inf in the weight or the input: the same outputs and gradients, NaN at the same places."""
    from torch import nn
    from torchao.quantization.qat.linear import FakeQuantizedLinear

    from fastft.nn import FakeQuantLinear

    linear = nn.Linear(96, 40, dtype=dtype)
    x, _ = with_specials(10, 96, dtype)
    if where == "weight":
        with torch.no_grad():
            linear.weight[3, 40] = NAN  # one weight group NaN: output column 3 NaN
            linear.weight[7, 70] = INF  # a symmetric group with inf: NaN too
        x = torch.where(x.isfinite(), x, 0.5)
    linear.weight.requires_grad_(trainable)
    ours = FakeQuantLinear.from_linear(linear, weight_bits=4, group_size=32, activation_bits=8)
    theirs = FakeQuantizedLinear(96, 40, bias=True, dtype=dtype, activation_config=torchao_qat.IntxFakeQuantizeConfig(
        torch.int8, granularity="per_token", is_symmetric=False), weight_config=torchao_qat.IntxFakeQuantizeConfig(
        torch.int4, group_size=32, is_symmetric=True))
    theirs.load_state_dict(linear.state_dict())
    theirs.weight.requires_grad_(trainable)
    grad = torch.randn(10, 40).to(dtype)
    results = []
    for layer in (ours, theirs):
        leaf = x.clone().requires_grad_()
        out = layer(leaf)
        params = [leaf, layer.bias] + ([layer.weight] if trainable else [])
        results.append((out, *torch.autograd.grad(out, params, grad)))
    for our_value, their_value in zip(*results):
        assert_same_values(our_value, their_value)
    out = results[0][0]
    assert out.isnan().any() and not out.isnan().all()
    if where == "weight":
        assert out[:, 3].isnan().all() and out[:, 7].isnan().all()


def test_asymmetric_groups_off_zero_keep_their_resolution():
    """A group in [1, 5] uses the whole integer range: every value within half a step of its fake-quantized value."""
    x = torch.linspace(1.0, 5.0, 64).reshape(2, 32)
    out = fake_quantize(x, 4, 32, symmetric=False)
    step = (5.0 - 0.0) / 15  # the range includes zero (zero stays representable)
    assert (out - x).abs().max() <= step / 2 + 1e-6
    assert out.unique().numel() >= 12


def test_straight_through_inside_the_range_and_zero_where_clamped():
    x = torch.randn(8, 32, dtype=torch.float32)  # one group per row
    x[:, 5] = 10.0  # each row's group max: 10 / (10 / 7.5) = 7.5 -> 8 -> clamped to 7
    x = x.requires_grad_()
    out = fake_quantize(x, 4, 32)
    (dx,) = torch.autograd.grad(out, [x], torch.ones_like(x))
    assert torch.all(dx[:, 5] == 0)
    assert torch.allclose(out[:, 5], torch.tensor(7 * 10.0 / 7.5), rtol=1e-6)  # clamped to 7 steps
    inside = torch.ones_like(dx, dtype=torch.bool)
    inside[:, 5] = False
    assert torch.allclose(dx[inside], torch.ones(()), rtol=1e-6)  # (dy * s) * (1 / s): 1 up to one rounding


def test_saves_only_x():
    from fastft.bench.harness import saved_for_backward_bytes

    x = torch.randn(64, 128, requires_grad=True)
    assert saved_for_backward_bytes(lambda: fake_quantize(x, 4, 32), exclude=[x]) == 0
    theirs = saved_for_backward_bytes(lambda: torchao_fake_quantize(x, 4, group_size=32, is_symmetric=True),
                                      exclude=[x])
    assert theirs >= x.numel() * 4  # torchao keeps fp32 intermediates of x's size


def test_opcheck():
    x = torch.randn(6, 64, requires_grad=True)
    scale = torch.rand(6, 2) * 0.1 + 0.05
    torch.library.opcheck(torch.ops.fastft.fake_quantize_with_scale.default,
                          (x, scale.requires_grad_(), torch.randn(6, 2, requires_grad=True), 4, 32))
    torch.library.opcheck(torch.ops.fastft.fake_quantize_with_scale.default, (x, scale, None, 4, 32))
    torch.library.opcheck(torch.ops.fastft.fake_quantize.default, (x, 4, 32, True, 1e-30))
    torch.library.opcheck(torch.ops.fastft.fake_quantize_backward.default,
                          (torch.randn(6, 64), x.detach(), 8, 64, False, 1e-30))


def test_native_and_reference_paths_agree_on_many_shapes():
    from fastft.ops import use_backend

    for (rows, groups, group), bits in itertools.product(((1, 1, 2), (3, 5, 8), (7, 3, 33), (2, 2, 1000)), (3, 8)):
        x = torch.randn(rows, groups * group) * 4
        results = []
        for name in ("native", "reference"):
            with use_backend(name):
                results.append(qat_ops.fake_quantize(x, bits, group, True, 1e-30))
        assert torch.equal(*results)


def test_bad_input_is_named():
    x = torch.randn(4, 48)
    with pytest.raises(ValueError, match="multiple of group_size"):
        fake_quantize(x, 4, 32)
    with pytest.raises(ValueError, match="bits must be"):
        fake_quantize(x, 9, 16)
    with pytest.raises(ValueError, match="granularity must be one of"):
        fake_quantize(x, 4, 16, granularity="per_tensor")
    with pytest.raises(ValueError, match="symmetric per_token"):
        fake_quantize(x, 8, granularity="per_token", symmetric=True)
    with pytest.raises(TypeError, match="x must be a float32"):
        fake_quantize(x.double(), 4, 16)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("bits,group_size", ((4, 32), (8, 64), (2, 128)))
def test_learned_scales_match_torchao_range_learning(dtype, bits, group_size):
    from fastft.qat import fake_quantize_with_scale, initial_scales

    g = torch.Generator().manual_seed(bits)
    weight = (torch.randn(40, 256, generator=g) * 2).to(dtype)
    quantizer = torchao_qat.IntxFakeQuantizer(torchao_qat.IntxFakeQuantizeConfig(
        getattr(torch, f"int{bits}"), group_size=group_size, is_symmetric=True, is_dynamic=False,
        range_learning=True))
    quantizer._initialized = True  # what torchao's initialize_fake_quantizers does before its first forward
    quantizer(weight)
    ours_scale = initial_scales(weight, bits, group_size)
    assert torch.equal(ours_scale, quantizer.scale.detach())
    with torch.no_grad():  # scales as they are after some training
        quantizer.scale.mul_(torch.empty(quantizer.scale.shape).uniform_(0.6, 1.4, generator=g))
    scale = quantizer.scale.detach().clone().requires_grad_()
    grad = torch.randn(40, 256, generator=g).to(dtype)
    x_theirs, x_ours = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    theirs = quantizer(x_theirs)
    their_dx, their_ds = torch.autograd.grad(theirs, [x_theirs, quantizer.scale], grad)
    ours = fake_quantize_with_scale(x_ours, scale, bits, group_size)
    our_dx, our_ds = torch.autograd.grad(ours, [x_ours, scale], grad)
    assert torch.equal(ours, theirs) and torch.equal(our_dx, their_dx)
    # the same formula; the sums (torchao: fp32 in torch's order, fastft's C++: fp64) may differ in the last bits,
    # and d(scale) is a difference of two such sums
    assert (our_ds - their_ds).abs().max() <= 1e-5 * their_ds.abs().max()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("bits,group_size", ((4, 32), (8, 64), (2, 128), (3, 40)))
def test_learned_zero_points_match_torchao_range_learning(backend, dtype, bits, group_size):
    """Asymmetric range learning: the same learned (scale, zero point), not integers any more, give torchao's
    output and dx bit for bit, and its d(scale) and d(zero point) up to the order of their sums."""
    from fastft.qat import fake_quantize_with_scale, initial_qparams

    g = torch.Generator().manual_seed(bits + group_size)
    weight = (torch.randn(40, 640, generator=g) * 2 + 0.3).to(dtype)
    weight[0, :group_size] = weight[0, :group_size].abs() + 1.0  # a group above zero: its zero point at qmin
    quantizer = torchao_qat.IntxFakeQuantizer(torchao_qat.IntxFakeQuantizeConfig(
        getattr(torch, f"int{bits}"), group_size=group_size, is_symmetric=False, is_dynamic=False,
        range_learning=True, zero_point_precision=torch.float32))
    quantizer._initialized = True
    quantizer(weight)  # creates torchao's scale and zero point parameters
    scale, zero_point = initial_qparams(weight, bits, group_size, symmetric=False)
    with torch.no_grad():  # as after some training: scales off by up to 40%, zero points off the integers
        quantizer.scale.copy_(scale * torch.empty(scale.shape).uniform_(0.6, 1.4, generator=g))
        quantizer.zero_point.copy_(zero_point + torch.empty(scale.shape).uniform_(-1.5, 1.5, generator=g))
    scale = quantizer.scale.detach().clone().requires_grad_()
    zero_point = quantizer.zero_point.detach().clone().requires_grad_()
    grad = torch.randn(40, 640, generator=g).to(dtype)
    x_theirs, x_ours = weight.clone().requires_grad_(), weight.clone().requires_grad_()
    theirs = quantizer(x_theirs)
    their_grads = torch.autograd.grad(theirs, [x_theirs, quantizer.scale, quantizer.zero_point], grad)
    ours = fake_quantize_with_scale(x_ours, scale, bits, group_size, zero_point=zero_point)
    our_grads = torch.autograd.grad(ours, [x_ours, scale, zero_point], grad)
    assert torch.equal(ours, theirs) and torch.equal(our_grads[0], their_grads[0])
    assert (our_grads[1] - their_grads[1]).abs().max() <= 1e-5 * their_grads[1].abs().max()
    # d(zero point) = sum of p inside the range - x_dtype(sum of p): two sums whose order differs (fp32 rounding of
    # their terms' magnitudes), the second rounded to x's dtype (one unit in its last place)
    p = (grad.float().reshape(-1, group_size) * scale.detach().reshape(-1, 1)).to(dtype).float()
    tolerance = (p.abs().sum(-1) * 1e-6 + p.sum(-1).abs() * torch.finfo(dtype).eps).reshape(scale.shape)
    assert torch.all((our_grads[2] - their_grads[2]).abs() <= tolerance)
    assert their_grads[2].abs().max() > 0  # some groups clamp, so the zero points do learn


def test_learned_qparams_bad_input_is_named():
    from fastft.qat import fake_quantize_with_scale, initial_qparams

    x = torch.randn(4, 64)
    scale, zero_point = initial_qparams(x, 4, 32, symmetric=False)
    with pytest.raises(ValueError, match="zero_point must be float32 of scale's shape"):
        fake_quantize_with_scale(x, scale, 4, 32, zero_point=zero_point[:, :1])
    with pytest.raises(ValueError, match="zero_point must be float32"):
        fake_quantize_with_scale(x, scale, 4, 32, zero_point=zero_point.double())
    with pytest.raises(ValueError, match=r"scale must be a float32 tensor of shape \(rows, K // group_size\)"):
        fake_quantize_with_scale(x, scale[:, :1], 4, 32, zero_point=zero_point)
    with pytest.raises(ValueError, match="weight must be 2-D"):
        initial_qparams(x[0], 4, 32)


@pytest.mark.parametrize("shape", ((2, 6), (12,), (1, 6, 2), (3, 4), (6, 2, 1)))
def test_a_wrongly_shaped_scale_is_refused_even_with_the_right_count(shape):
    """scale and zero_point must have the shape (rows, K // group_size): as many values in another layout would
    give groups other groups' scales."""
    from fastft.qat import fake_quantize_with_scale, initial_qparams

    x = torch.randn(6, 64)
    scale, zero_point = initial_qparams(x, 4, 32, symmetric=False)  # (6, 2)
    with pytest.raises(ValueError, match=r"scale must be a float32 tensor of shape \(rows, K // group_size\) = "
                                         r"\(6, 2\) .*got torch.float32 of shape " + re.escape(str(shape))):
        fake_quantize_with_scale(x, scale.reshape(shape), 4, 32)
    with pytest.raises(ValueError, match=r"zero_point must be float32 of scale's shape \(rows, K // group_size\) "
                                         r"= \(6, 2\)"):
        fake_quantize_with_scale(x, scale, 4, 32, zero_point=zero_point.reshape(shape))
    assert torch.equal(fake_quantize_with_scale(x, scale, 4, 32, zero_point=zero_point),
                       fake_quantize(x, 4, 32, symmetric=False))  # the right shape: the dynamic qparams' result


def test_fake_quant_linear_learns_scales_and_converts_with_them():
    from torch import nn

    from fastft.nn import FakeQuantLinear, QuantizedLinear

    torch.manual_seed(0)
    layer = FakeQuantLinear.from_linear(nn.Linear(64, 24), weight_bits=4, group_size=32, learn_scales=True)
    start = layer.weight_scale.detach().clone()
    optimizer = torch.optim.SGD(layer.parameters(), lr=1e-2)
    x, target = torch.randn(16, 64), torch.randn(16, 24)
    for _ in range(5):
        torch.nn.functional.mse_loss(layer(x), target).backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(layer.weight_scale.detach(), start)
    converted = QuantizedLinear.from_fake_quant(layer)
    with torch.no_grad():
        assert torch.equal(converted(x), layer(x))
    assert "weight_scale" in layer.state_dict()


def composed_fake_quant_linear(x, weight, bias, activation_bits, quantize_weight):
    """The QAT linear as separate autograd steps: fake-quantize x (per token) and W (per group), then F.linear."""
    x_q = fake_quantize(x, activation_bits, granularity="per_token", symmetric=False) if activation_bits else x
    w_q = fake_quantize(weight, 4, 32) if quantize_weight else weight
    return torch.nn.functional.linear(x_q, w_q, bias)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("activation_bits, quantize_weight", ((8, True), (0, True), (8, False), (4, False)))
def test_fake_quant_linear_op_equals_the_composed_layer(backend, dtype, activation_bits, quantize_weight):
    """Same outputs and gradients as fake_quantize + F.linear under autograd, which saves x_q and W_q; the op saves
    x and W only."""
    g = torch.Generator().manual_seed(activation_bits)
    x = (torch.randn(37, 96, generator=g) * 2).to(dtype)
    weight = torch.randn(40, 96, generator=g).to(dtype)
    bias = torch.randn(40, generator=g).to(dtype)
    grad = torch.randn(37, 40, generator=g).to(dtype)
    results = []
    for run in (lambda *t: qat_ops.fake_quant_linear(*t, 4, 32, activation_bits, quantize_weight),
                lambda *t: composed_fake_quant_linear(*t, activation_bits, quantize_weight)):
        leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
        out = run(*leaves)
        results.append((out, *torch.autograd.grad(out, leaves, grad)))
    for ours, theirs in zip(*results):
        assert torch.equal(ours, theirs)


def test_fake_quant_linear_opcheck():
    x, weight, bias = torch.randn(6, 64, requires_grad=True), torch.randn(8, 64, requires_grad=True), torch.randn(8)
    torch.library.opcheck(torch.ops.fastft.fake_quant_linear.default, (x, weight, bias, 4, 32, 8, True))
    torch.library.opcheck(torch.ops.fastft.fake_quant_linear.default, (x, weight, None, 4, 32, 0, False))


def test_fake_quant_linear_saves_x_and_the_weight_only():
    from fastft.bench.harness import saved_for_backward_bytes

    x = torch.randn(64, 96, requires_grad=True)
    weight, bias = torch.randn(40, 96, requires_grad=True), torch.randn(40, requires_grad=True)
    ours = saved_for_backward_bytes(lambda: qat_ops.fake_quant_linear(x, weight, bias, 4, 32, 8, True),
                                    exclude=[weight, bias])
    composed = saved_for_backward_bytes(lambda: composed_fake_quant_linear(x, weight, bias, 8, True),
                                        exclude=[weight, bias])
    assert ours == x.nbytes  # fake-quantized copies of x and W are recomputed in backward
    assert composed >= 2 * x.nbytes + weight.nbytes
