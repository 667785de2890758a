"""fastft.nf4.matmul and the fastft::nf4_* ops: forward, dx, dbias vs the fp64 reference, gradcheck, opcheck."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOLERANCE, rel_error
from fastft import nf4
from fastft.ops import use_backend

# (out_features, in_features, blocksize): K % 8 == 0 takes the vectorized kernels, the others the ragged paths;
# 77 * 33 elements make blocks straddle rows; 240 * 24 with blocks of 128: runs of 64 elements and of 16 (AVX-512).
WEIGHTS = ((96, 128, 64), (130, 72, 32), (33, 77, 64), (64, 200, 128), (24, 240, 128))
ROWS = (1, 3, 4, 5, 17, 70)


def quantized(out_features, in_features, blocksize, double_quant=True, quant_type="nf4"):
    weight = torch.randn(out_features, in_features) / in_features**0.5
    return nf4.quantize(weight, blocksize, double_quant, quant_type)


def reference(x, packed, state, bias, grad):
    """fp64 forward and gradients with the weight dequantized in x's dtype (bitsandbytes' rule)."""
    weight = nf4.dequantize(packed, state, x.dtype).double()
    x64 = x.detach().double().requires_grad_()
    b64 = None if bias is None else bias.detach().double().requires_grad_()
    y = torch.nn.functional.linear(x64, weight, b64)
    y.backward(grad.double())
    return y, x64.grad, None if b64 is None else b64.grad


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("weight_shape", WEIGHTS)
@pytest.mark.parametrize("double_quant", (False, True))
def test_matmul_forward_and_gradients(backend, dtype, weight_shape, double_quant):
    out_features, in_features, blocksize = weight_shape
    packed, state = quantized(out_features, in_features, blocksize, double_quant)
    for rows in ROWS:
        x = torch.randn(2, rows, in_features).to(dtype).requires_grad_()
        bias = torch.randn(out_features).to(dtype).requires_grad_()
        grad = torch.randn(2, rows, out_features).to(dtype)
        y = nf4.matmul(x, packed, state, bias)
        y.backward(grad)
        y_ref, dx_ref, db_ref = reference(x, packed, state, bias, grad)
        assert y.dtype == dtype and y.shape == (2, rows, out_features)
        tol = TOLERANCE[dtype]
        assert rel_error(y, y_ref) < tol, rows
        assert rel_error(x.grad, dx_ref) < tol, rows
        assert rel_error(bias.grad, db_ref) < tol, rows


@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
def test_matmul_non_contiguous_input_and_no_bias(backend, quant_type):
    packed, state = quantized(48, 64, 32, quant_type=quant_type)
    x = torch.randn(64, 10).t().requires_grad_()  # (10, 64), non-contiguous
    assert not x.is_contiguous()
    grad = torch.randn(10, 48)
    y = nf4.matmul(x, packed, state)
    y.backward(grad)
    y_ref, dx_ref, _ = reference(x, packed, state, None, grad)
    assert rel_error(y, y_ref) < 1e-5 and rel_error(x.grad, dx_ref) < 1e-5


def test_gradcheck_fp64(backend):
    packed, state = quantized(12, 24, 32)
    x = torch.randn(3, 24, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: nf4.matmul(a, packed, state, b), (x, bias))
    assert torch.autograd.gradgradcheck(lambda a, b: nf4.matmul(a, packed, state, b), (x, bias))


def test_opcheck_schema_fake_and_autograd_registrations():
    packed, state = quantized(24, 40, 32)
    x = torch.randn(5, 40, requires_grad=True)
    bias = torch.randn(24, requires_grad=True)
    ops = torch.ops.fastft
    torch.library.opcheck(ops.nf4_linear.default, (x, packed, *state.op_args(), 24, bias))
    torch.library.opcheck(ops.nf4_linear_grad_input.default, (torch.randn(5, 24), packed, *state.op_args(), 40))
    torch.library.opcheck(ops.nf4_dequantize.default, (packed, *state.op_args(), [24, 40], torch.bfloat16))


def test_compiles_with_torch_compile():
    packed, state = quantized(24, 40, 32)
    x = torch.randn(5, 40)
    compiled = torch.compile(lambda a: nf4.matmul(a, packed, state) * 2, backend="eager", fullgraph=True)
    assert torch.equal(compiled(x), nf4.matmul(x, packed, state) * 2)


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), out_features=st.integers(1, 90), in_features=st.integers(1, 150),
       blocksize=st.sampled_from((32, 64, 128)), double_quant=st.booleans())
def test_native_matmul_matches_reference(rows, out_features, in_features, blocksize, double_quant):
    packed, state = quantized(out_features, in_features, blocksize, double_quant)
    x = torch.randn(rows, in_features)
    grad = torch.randn(rows, out_features)
    results = {}
    for name in ("native", "reference"):
        with use_backend(name):
            xi = x.clone().requires_grad_()
            y = nf4.matmul(xi, packed, state)
            y.backward(grad)
            results[name] = (y, xi.grad)
    assert rel_error(results["native"][0], results["reference"][0]) < 1e-5
    assert rel_error(results["native"][1], results["reference"][1]) < 1e-5


def test_matmul_bad_inputs():
    packed, state = quantized(16, 32, 32)
    with pytest.raises(ValueError, match="in_features 32"):
        nf4.matmul(torch.randn(3, 31), packed, state)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        nf4.matmul(torch.ones(3, 32, dtype=torch.int64), packed, state)
    with pytest.raises(TypeError, match="bias dtype"):
        nf4.matmul(torch.randn(3, 32), packed, state, torch.randn(16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        nf4.matmul(torch.randn(3, 32), packed, state, torch.randn(15))
    with pytest.raises(ValueError, match="x is on meta"):
        nf4.matmul(torch.randn(3, 32, device="meta"), packed, state)


def test_forced_backend_is_validated(monkeypatch):
    monkeypatch.setenv("FASTFT_BACKEND", "cuda")
    with pytest.raises(ValueError, match="FASTFT_BACKEND must be one of"):
        nf4.dequantize(*quantized(4, 32, 32))
    monkeypatch.setenv("FASTFT_BACKEND", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        nf4.dequantize(*quantized(4, 32, 32))
