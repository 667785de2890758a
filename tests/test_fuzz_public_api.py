"""Property-based fuzzing of the public functions over shapes, strides, dtypes and values (NaN, inf, huge, zero,
empty): each call either raises a clear error (ValueError / TypeError) or returns the plain-torch reference's
result, NaN for NaN. Nothing else: no IndexError or RuntimeError from inside, no crash, no silent wrong number."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fastft import losses, nf4, qat
from fastft.nn import BottleneckAdapter
from fastft.reference import qat as qat_ref
from fastft.reference.bottleneck import bottleneck_adapter_ref
from fastft.reference.distillation import distillation_ref

CLEAR_ERRORS = (ValueError, TypeError)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTYPES = st.sampled_from((torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64))
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@st.composite
def tensors(draw, shape, dtype=None):
    """A tensor of `shape` (maybe non-contiguous: a transposed or a strided view) whose values may hold NaN, inf,
    huge, tiny or all-zero entries."""
    dtype = draw(DTYPES) if dtype is None else dtype
    kind = draw(st.sampled_from(("normal", "normal", "nan", "inf", "huge", "zero", "tiny")))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    base = torch.randn(shape, generator=generator, dtype=torch.float64)
    if kind == "zero":
        base.zero_()
    elif kind == "huge":
        base *= 1e4 if dtype in (torch.float16, torch.bfloat16) else 1e30
    elif kind == "tiny":
        base *= 1e-30
    elif kind in ("nan", "inf") and base.numel():
        index = draw(st.integers(0, base.numel() - 1))
        base.view(-1)[index] = math.nan if kind == "nan" else -math.inf
    value = base.round() if not dtype.is_floating_point else base
    value = value.clamp(-1e6, 1e6).to(dtype) if not dtype.is_floating_point else value.to(dtype)
    layout = draw(st.sampled_from(("contiguous", "contiguous", "transposed", "strided")))
    if layout == "transposed" and value.dim() >= 2:
        value = value.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided" and value.dim() >= 1:
        wide = torch.zeros(*value.shape[:-1], 2 * value.shape[-1], dtype=dtype)
        wide[..., ::2] = value
        value = wide[..., ::2]
    return value


def assert_matches(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale=None) -> None:
    """Same shape and dtype, NaN exactly where the reference has NaN, infinities equal, the rest within the dtype's
    tolerance relative to `scale` (default: the largest |expected|; for a sum of products, the largest sum of
    |products|, the size its rounding error is proportional to)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    a, e = actual.detach().double(), expected.detach().double()
    assert torch.equal(torch.isnan(a), torch.isnan(e))
    finite = torch.isfinite(e)
    assert torch.equal(a[~finite & ~torch.isnan(e)], e[~finite & ~torch.isnan(e)])
    a, e = a[finite], e[finite]
    if e.numel():
        scale = e.abs().max() if scale is None else torch.as_tensor(scale, dtype=torch.float64)
        assert float((a - e).abs().max() / scale.clamp(min=1e-30)) <= TOLERANCE[dtype]


@FUZZ
@given(data=st.data(), rows=st.integers(0, 9), cols=st.integers(0, 80), blocksize=st.sampled_from((32, 64, 128)),
       double_quant=st.booleans())
def test_nf4_quantize_and_dequantize(data, rows, cols, blocksize, double_quant):
    weight = data.draw(tensors((rows, cols)))
    valid = weight.dtype in FLOATS and weight.numel() > 0 and bool(torch.isfinite(weight).all())
    try:
        packed, state = nf4.quantize(weight, blocksize, double_quant)
    except CLEAR_ERRORS:
        assert not valid
        return
    assert valid  # the native codes equal the reference's
    from fastft.ops import use_backend

    with use_backend("reference"):
        packed_ref, state_ref = nf4.quantize(weight, blocksize, double_quant)
        dense_ref = nf4.dequantize(packed_ref, state_ref)
    assert torch.equal(packed, packed_ref)
    assert torch.equal(nf4.dequantize(packed, state), dense_ref)


@FUZZ
@given(data=st.data(), batch=st.integers(0, 5), in_features=st.sampled_from((16, 48, 64, 70)),
       out_features=st.integers(1, 40))
def test_nf4_matmul(data, batch, in_features, out_features):
    weight = torch.randn(out_features, in_features)
    packed, state = nf4.quantize(weight, 32, data.draw(st.booleans()))
    x_features = data.draw(st.sampled_from((in_features, in_features, in_features + 1)))
    x = data.draw(tensors((batch, x_features)))
    try:
        y = nf4.matmul(x, packed, state)
    except CLEAR_ERRORS:
        assert not x.is_floating_point() or x_features != in_features
        return
    dense = nf4.dequantize(packed, state, dtype=x.dtype)
    sums_of_products = torch.nn.functional.linear(x.double().abs(), dense.double().abs()).nan_to_num(0.0)
    assert_matches(y, torch.nn.functional.linear(x, dense), x.dtype,
                   sums_of_products.max() if sums_of_products.numel() else None)


@FUZZ
@given(data=st.data(), rows=st.integers(0, 6), groups=st.integers(0, 4), group_size=st.sampled_from((8, 16, 32)),
       bits=st.sampled_from((2, 4, 8)), symmetric=st.booleans())
def test_fake_quantize(data, rows, groups, group_size, bits, symmetric):
    x = data.draw(tensors((rows, groups * group_size + data.draw(st.sampled_from((0, 0, 3))))))
    try:
        out = qat.fake_quantize(x, bits, group_size, symmetric)
    except CLEAR_ERRORS:
        assert x.dtype not in FLOATS or x.shape[-1] == 0 or x.shape[-1] % group_size
        return
    assert_matches(out, qat_ref.fake_quantize_ref(x, bits, group_size, symmetric), x.dtype)


@FUZZ
@given(data=st.data(), rows=st.integers(1, 6), groups=st.integers(1, 4), group_size=st.sampled_from((8, 32)),
       scale_shape=st.sampled_from(("right", "flat", "transposed")))
def test_fake_quantize_with_scale(data, rows, groups, group_size, scale_shape):
    x = data.draw(tensors((rows, groups * group_size), torch.float32))
    scale = qat.initial_scales(torch.nan_to_num(x), 4, group_size)
    scale = {"right": scale, "flat": scale.reshape(-1), "transposed": scale.t()}[scale_shape]
    try:
        out = qat.fake_quantize_with_scale(x, scale, 4, group_size)
    except CLEAR_ERRORS:
        assert scale.shape != (rows, groups)
        return
    assert scale.shape == (rows, groups)  # a transposed (non-contiguous) scale of a square shape is accepted
    assert_matches(out, qat_ref.fake_quantize_with_scale_ref(x, scale, 4, group_size), x.dtype)


@FUZZ
@given(data=st.data(), tokens=st.integers(0, 7), hidden=st.integers(1, 40), vocab=st.integers(2, 50),
       beta=st.sampled_from((0.0, 0.5, 1.0)), temperature=st.sampled_from((0.5, 1.0, 2.0, 0.0, math.nan)),
       alpha=st.sampled_from((1.0, 0.5)), reduction=st.sampled_from(("mean", "sum", "none")))
def test_fused_linear_distillation(data, tokens, hidden, vocab, beta, temperature, alpha, reduction):
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64, torch.float16)))
    student = data.draw(tensors((tokens, hidden), dtype))
    student_head = data.draw(tensors((vocab, hidden), dtype))
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1)))  # reproducible draws
    teacher = torch.randn(tokens, hidden, dtype=dtype, generator=generator)
    teacher_head = torch.randn(vocab, hidden, dtype=dtype, generator=generator)
    labels = torch.randint(-1, vocab + 1, (tokens,), generator=generator) if data.draw(st.booleans()) \
        else torch.randint(0, vocab, (tokens,), generator=generator)
    args = (student, student_head, teacher, teacher_head, labels)
    options = dict(beta=beta, temperature=temperature, alpha=alpha, reduction=reduction, ignore_index=-1)
    try:
        loss = losses.fused_linear_distillation(*args, **options)
    except CLEAR_ERRORS:
        assert not (0.01 <= temperature <= 100) or bool((labels == vocab).any())
        return
    assert bool(((labels >= -1) & (labels < vocab)).all())
    compute = torch.float64 if dtype == torch.float64 else torch.float32
    expected = distillation_ref(*args, **options, dtype=compute)
    # fp16 inputs: the loss is computed in fp32 from them, but the softmax of their huge logits (1e4 scale, drawn
    # here) resolves differences of fp32 rounding size only: compared at fp16's tolerance. A token's soft term is a
    # sum over the vocabulary of p * (log p - log m), whose rounding error scales with the sum of the |p log p|
    # terms (up to log(vocab)), not with the divergence, which may be near 0: the scale is at least log(vocab) per
    # token counted.
    counted = max(1, int((labels != -1).sum())) if reduction == "sum" else 1
    finite = expected[torch.isfinite(expected)].abs()
    scale = max(float(finite.max()) if finite.numel() else 0.0, math.log(vocab) * counted)
    assert_matches(loss, expected.to(loss.dtype), torch.float16 if dtype == torch.float16 else compute, scale=scale)


@FUZZ
@given(data=st.data(), tokens=st.integers(0, 9), hidden=st.sampled_from((8, 24, 33)),
       activation=st.sampled_from(("relu", "gelu", "silu")))
def test_bottleneck_adapter(data, tokens, hidden, activation):
    adapter = BottleneckAdapter(hidden, reduction_factor=4, activation=activation)
    with torch.no_grad():
        adapter.up.weight.normal_()
    h = data.draw(tensors((2, tokens, hidden)))
    try:
        out = adapter(h)
    except CLEAR_ERRORS:
        assert not h.is_floating_point()
        return
    assert h.is_floating_point()
    expected = bottleneck_adapter_ref(h, adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias,
                                      activation)
    assert_matches(out, expected, torch.float32 if h.dtype == torch.float64 else h.dtype)


@pytest.mark.parametrize("call", [
    lambda: nf4.quantize(torch.randn(4, 64), blocksize=True),
    lambda: nf4.matmul(torch.randn(2, 3), *nf4.quantize(torch.randn(4, 64))),
    lambda: qat.fake_quantize(torch.randn(4, 30), 4, 32),
    lambda: losses.fused_linear_cross_entropy(torch.randn(3, 8), torch.randn(5, 8), torch.tensor([0, 1, 7])),
])
def test_examples_of_clear_errors(call):
    with pytest.raises(CLEAR_ERRORS):
        call()
