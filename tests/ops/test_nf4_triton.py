"""kernels/nf4.py and kernels/lora.py under the Triton interpreter (run with TRITON_INTERPRET=1 in its own process: `make test`)."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from fastft import nf4  # noqa: E402
from fastft.kernels import nf4 as kernels  # noqa: E402
from fastft.ops import use_backend  # noqa: E402


def rel_error(actual, expected):
    actual, expected = actual.detach().double(), expected.detach().double()
    assert not torch.isnan(actual).any()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("double_quant", (False, True))
@pytest.mark.parametrize("quant_type", ("nf4", "fp4"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_dequantize_kernel_is_bit_exact(double_quant, quant_type, dtype):
    torch.manual_seed(0)
    for shape, blocksize in (((100, 72), 32), ((33, 77), 64), ((5, 301), 128)):
        packed, state = nf4.quantize(torch.randn(shape), blocksize, double_quant, quant_type)
        with use_backend("reference"):
            expected = nf4.dequantize(packed, state, dtype)
        out = kernels.nf4_dequantize(packed, *state.op_args(), list(shape), dtype)
        assert torch.equal(out, expected), shape
        buffer = torch.full(shape, float("nan"), dtype=dtype)
        with use_backend("triton"):
            assert nf4.dequantize(packed, state, out=buffer) is buffer
        assert torch.equal(buffer, expected), shape


# (out_features, in_features, blocksize, the W-tile path). ROWS: K even and a multiple of the blocksize (vectorized
# code bytes, a scale per (row, block) of the tile; blocks narrower and wider than the 64 / 128-wide K tiles);
# ELEMENTS: odd K, or blocks straddling rows.
WEIGHT_SHAPES = ((130, 72, 32, False), (33, 77, 64, False), (64, 160, 64, False), (130, 128, 64, True),
                 (33, 192, 32, True), (70, 256, 128, True), (40, 512, 256, True))


@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
@pytest.mark.parametrize("double_quant", (False, True))
def test_matmul_kernels_match_reference(dtype, double_quant):
    torch.manual_seed(0)
    for (out_features, in_features, blocksize, rows_path) in WEIGHT_SHAPES:
        packed, state = nf4.quantize(torch.randn(out_features, in_features) / 8, blocksize, double_quant)
        assert kernels._weight_args(packed, *state.op_args(), in_features)[2]["ROWS"] == rows_path
        weight = nf4.dequantize(packed, state, dtype).double()
        # 1, 17, 70, 200 rows: the heuristic's 16, 32, 64 and 128-row tiles
        for rows in (1, 17, 70, 200):
            x = torch.randn(rows, in_features).to(dtype)
            bias = torch.randn(out_features).to(dtype)
            y = kernels.nf4_linear(x, packed, *state.op_args(), out_features, bias)
            assert rel_error(y, x.double() @ weight.t() + bias.double()) < TOLERANCE[dtype], rows
            dy = torch.randn(rows, out_features).to(dtype)
            dx = kernels.nf4_linear_grad_input(dy, packed, *state.op_args(), in_features)
            assert rel_error(dx, dy.double() @ weight) < TOLERANCE[dtype], rows


@pytest.mark.parametrize("double_quant", (False, True))
def test_matmul_kernels_decode_the_weight_bit_exactly(double_quant):
    """Identity activations make each output element one product: y = x @ W^T with x = I is W^T, and dy @ W with
    dy = I is W, so the kernels' in-register decode (ROWS and ELEMENTS paths) must give the reference's bf16 W bit
    for bit (bf16 outputs hold the decoded value exactly)."""
    for out_features, in_features, blocksize, _ in WEIGHT_SHAPES[:6]:
        packed, state = nf4.quantize(torch.randn(out_features, in_features), blocksize, double_quant)
        with use_backend("reference"):
            weight = nf4.dequantize(packed, state, torch.bfloat16)
        eye_k = torch.eye(in_features, dtype=torch.bfloat16)
        assert torch.equal(kernels.nf4_linear(eye_k, packed, *state.op_args(), out_features, None), weight.t())
        eye_n = torch.eye(out_features, dtype=torch.bfloat16)
        assert torch.equal(kernels.nf4_linear_grad_input(eye_n, packed, *state.op_args(), in_features), weight)


# Per-product error of each precision for a K-deep dot (kernels/common.py): TF32 2^-10 (1 + 2^-12); TF32x3
# 3 * 2^-22 plus 2 K 2^-23 for the extra accumulation roundings of its three MMAs (assert_gemm_close adds K 2^-23).
UNITS = {"tf32": lambda k: 2.0 ** -10 * (1 + 2.0 ** -12), "tf32x3": lambda k: 3 * 2.0 ** -22 + 2 * k * 2.0 ** -23}


@pytest.mark.parametrize("precision", ("tf32", "tf32x3"))
def test_fp32_gemm_within_its_tensor_core_error_bound(monkeypatch, precision):
    """fp32 x on tensor cores: elementwise within the TF32 / TF32x3 bound of fastft.kernels.common (on GPUs; the
    interpreter computes the dot in fp32, well inside it), with products that cancel (zero-mean data)."""
    from conftest import assert_gemm_close

    monkeypatch.setenv("FASTFT_FP32_PRECISION", precision)
    torch.manual_seed(0)
    packed, state = nf4.quantize(torch.randn(130, 256), 64, True)
    weight = nf4.dequantize(packed, state, torch.float32)
    x = torch.randn(70, 256)
    assert_gemm_close(kernels.nf4_linear(x, packed, *state.op_args(), 130, None), x, weight.t(),
                      UNITS[precision](256))
    dy = torch.randn(70, 130)
    assert_gemm_close(kernels.nf4_linear_grad_input(dy, packed, *state.op_args(), 256), dy, weight,
                      UNITS[precision](130))


def test_op_autograd_on_the_triton_path():
    torch.manual_seed(0)
    packed, state = nf4.quantize(torch.randn(40, 96), 64, double_quant=True)
    x = torch.randn(2, 3, 96, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    grad = torch.randn(2, 3, 40)
    with use_backend("triton"):
        y = nf4.matmul(x, packed, state, bias)
        y.backward(grad)
    weight = nf4.dequantize(packed, state).double()
    assert rel_error(y, x.double() @ weight.t() + bias.double()) < 1e-5
    assert rel_error(x.grad, grad.double() @ weight) < 1e-5
    assert rel_error(bias.grad, grad.double().sum((0, 1))) < 1e-5


def test_launchers_reject_unsupported_dtypes():
    packed, state = nf4.quantize(torch.randn(8, 32), 32)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        kernels.nf4_linear(torch.randn(2, 32, dtype=torch.float64), packed, *state.op_args(), 8, None)


def test_lora_dropout_kernel_is_bit_exact():
    from fastft.kernels import lora as lora_kernels
    from fastft.reference.lora import lora_dropout_ref

    x = torch.randn(301, 67)
    for p, seed in ((0.05, 0), (0.5, 1), (0.9, 2**31 + 7), (0.3, 2**32 - 1)):
        assert torch.equal(lora_kernels.lora_dropout(x, p, seed), lora_dropout_ref(x, p, seed))
        # bf16: the same mask; values within bf16 rounding (the interpreter's fp32 -> bf16 cast truncates).
        ours, expected = lora_kernels.lora_dropout(x.bfloat16(), p, seed), lora_dropout_ref(x.bfloat16(), p, seed)
        assert torch.equal(ours == 0, expected == 0)
        assert rel_error(ours, expected) < 1e-2
