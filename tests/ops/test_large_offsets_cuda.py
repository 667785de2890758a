"""The Triton kernels on tensors of more than 2^31 elements (bench/gpu_check.sh, on a GPU with ~40 GiB free): every
offset a kernel forms from such a tensor's index must be int64. Each op runs on a whole large tensor (ROWS x K) with
the Triton backend and the reference runs on its first and last SLICE rows alone (the last ones past element 2^31):
rows are independent in each op, so the outputs at those rows must agree, and the gradients, taken through the
selection of those rows (zero elsewhere), too. bf16 activations, as such sizes are trained."""

import os

import pytest
import torch

if os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("tensors of more than 2^31 elements: on a GPU only (FASTFT_TEST_DEVICE=cuda, bench/gpu_check.sh)",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run by gpu_check.sh with the other Triton tests

from conftest import rel_error  # noqa: E402
from fastft import nf4  # noqa: E402
from fastft.ewc import ewc_penalty_  # noqa: E402
from fastft.ops import use_backend  # noqa: E402
from fastft.ops import bottleneck as bottleneck_ops, lora as lora_ops, qat as qat_ops  # noqa: E402

K = 4096  # the inner dimension of every large tensor
ROWS = 2**31 // K + 128  # ROWS x K > 2^31; element 2^31 lies in row 2^31 / K, inside the last SLICE rows
SLICE = 256  # rows compared at each end (a multiple of 4: whole nested-absmax groups of a 4-bit weight)
ENDS = torch.cat([torch.arange(SLICE), torch.arange(ROWS - SLICE, ROWS)])
BF16 = 1e-2


def randn(*shape, std=1.0):
    return torch.randn(*shape).mul_(std).to(torch.bfloat16)


def ends_of(t):
    """The first and last SLICE rows of `t` (ROWS, ...), as one (2 SLICE, ...) tensor."""
    return torch.cat([t[:SLICE], t[-SLICE:]])


def run(op, inputs, select, grad):
    """(outputs, gradients of `inputs`): out = select(op(*leaves)), backward with `grad`."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = select(op(*leaves))
    return (out, *torch.autograd.grad(out, leaves, grad))


def compare(op, big, ends, select, grad, row_gradients, reference_op=None):
    """op(*big) with Triton, its outputs selected by `select`, vs (reference_op or op)(*ends) with the reference;
    the gradients of the inputs too: those with row_gradients True are (ROWS, ...) inputs compared at ENDS."""
    with use_backend("triton"):
        got = run(op, big, select, grad)
    with use_backend("reference"):
        expected = run(reference_op or op, ends, lambda out: out, grad)
    assert rel_error(got[0], expected[0]) < BF16
    for g, e, rows in zip(got[1:], expected[1:], row_gradients):
        assert rel_error(g[ENDS] if rows else g, e) < BF16


@pytest.mark.parametrize("double_quant", (False, True))
def test_nf4_weight(double_quant):
    """Dequantize, x @ W^T and its grad_input on a 4-bit W of ROWS x K elements (1 GiB of codes)."""
    blocksize = 64
    per_row = K // blocksize
    tables = nf4.quantize(torch.randn(64, K), blocksize, double_quant)[1]
    packed = torch.randint(0, 256, (ROWS * K // 2, 1), dtype=torch.uint8)
    if double_quant:
        absmax = torch.randint(0, 256, (ROWS * per_row,), dtype=torch.uint8)
        nested = torch.rand(ROWS * per_row // 256) * 0.05 + 0.01
        groups = SLICE * per_row // 256  # nested groups of SLICE rows
        nested_ends = torch.cat([nested[:groups], nested[-groups:]])
    else:
        absmax, nested, nested_ends = torch.rand(ROWS * per_row) * 0.1 + 0.01, None, None

    def state(absmax, nested, rows):
        return nf4.NF4State(absmax=absmax, shape=(rows, K), dtype=torch.bfloat16, blocksize=blocksize,
                            code=tables.code, nested_absmax=nested, nested_code=tables.nested_code,
                            nested_offset=0.03)

    big = packed, state(absmax, nested, ROWS)
    ends = (ends_of(packed.view(ROWS, K // 2)).reshape(-1, 1),
            state(ends_of(absmax.view(ROWS, per_row)).reshape(-1), nested_ends, 2 * SLICE))
    with use_backend("triton"):
        w = ends_of(nf4.dequantize(*big, torch.bfloat16))
    with use_backend("reference"):
        assert torch.equal(w, nf4.dequantize(*ends, torch.bfloat16))  # bit-exact
    del w
    x = randn(16, K)
    compare(lambda x: nf4.matmul(x, *big), [x], [x], lambda y: y[:, ENDS], randn(16, 2 * SLICE), (False,),
            reference_op=lambda x: nf4.matmul(x, *ends))


def test_fake_quant_linear_weight():
    """QAT's fused fake-quant linear (int4 weight groups of 32, int8 tokens) with a ROWS x K weight: forward and the
    gradients of x, the weight and the bias."""
    x, weight, bias = randn(16, K), randn(ROWS, K, std=0.02), randn(ROWS)
    op = lambda x, w, b: qat_ops.fake_quant_linear(x, w, b, 4, 32, 8, True)  # noqa: E731
    compare(op, [x, weight, bias], [x, ends_of(weight), ends_of(bias)], lambda y: y[:, ENDS],
            randn(16, 2 * SLICE), (False, True, True))


def test_lora_input():
    """A LoRA term (r = 16, no dropout) of a ROWS x K input: delta and the gradients of x, A and B."""
    x, lora_a, lora_b = randn(ROWS, K), randn(16, K, std=0.02), randn(64, 16, std=0.1)
    op = lambda x, a, b: lora_ops.lora_delta(x, a, b, 2.0, 0.0, 0)[0]  # noqa: E731
    compare(op, [x, lora_a, lora_b], [ends_of(x), lora_a, lora_b], lambda delta: delta[ENDS],
            randn(2 * SLICE, 64), (True, False, False))


def test_bottleneck_input():
    """A bottleneck adapter (r = 64, GELU, no residual, no LayerNorm) on a ROWS x K input: output and the gradients of
    x and the four weights."""
    x = randn(ROWS, K)
    weights = [randn(64, K, std=0.02), randn(64), randn(K, 64, std=0.1), randn(K)]

    def op(x, w_down, b_down, w_up, b_up):
        return bottleneck_ops.bottleneck_adapter(x, w_down, b_down, w_up, b_up, "gelu", 0.7, None, None, None, False,
                                                 1e-5)[0]

    compare(op, [x, *weights], [ends_of(x), *weights], lambda out: out[ENDS], randn(2 * SLICE, K),
            (True, False, False, False, False))


def test_ewc_tensor():
    """The EWC pass over one ROWS x K parameter (Fisher zero but on the first and last rows): the penalty and the
    gradient rows it adds to."""
    param, grad, anchor = randn(ROWS, K), randn(ROWS, K), randn(ROWS, K)
    fisher = torch.zeros(ROWS, K, dtype=torch.bfloat16)
    fisher[:SLICE], fisher[-SLICE:] = torch.rand(SLICE, K), torch.rand(SLICE, K)
    ends = [ends_of(t) for t in (param, grad, fisher, anchor)]  # copies, taken before grad is updated in place
    with use_backend("triton"):
        penalty = ewc_penalty_([param], [grad], [fisher], [anchor], 3.5)
    with use_backend("reference"):
        expected = ewc_penalty_(*([t] for t in ends), 3.5)
    expected_grad = ends[1]
    assert rel_error(penalty, expected) < 1e-5
    assert rel_error(ends_of(grad), expected_grad) < BF16
