"""kernels/lora.py's GEMM kernels under the Triton interpreter, through fastft::lora_deltas with the triton backend:
a group of adapters (ragged ranks, each with its own dropout seed) against the per-adapter fp64 reference."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from conftest import rel_error  # noqa: E402
from fastft.ops import lora as ops  # noqa: E402
from fastft.ops import use_backend  # noqa: E402
from fastft.reference.lora import lora_delta_ref  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def group_inputs(rows, in_features, ranks, x_dtype, a_dtype):
    g = torch.Generator(torch.get_default_device()).manual_seed(rows + in_features + sum(ranks))
    x = torch.randn(rows, in_features, generator=g).to(x_dtype).requires_grad_()
    As = [(torch.randn(r, in_features, generator=g) * 0.3).to(a_dtype).requires_grad_() for r in ranks]
    Bs = [(torch.randn(24 + 7 * i, r, generator=g) * 0.3).to(a_dtype).requires_grad_() for i, r in enumerate(ranks)]
    biases = [torch.randn(B.shape[0], generator=g).to(a_dtype).requires_grad_() if i != 1 else None
              for i, B in enumerate(Bs)]
    grads = [torch.randn(rows, B.shape[0], generator=g).to(a_dtype) for B in Bs]
    return x, As, Bs, biases, grads


@pytest.mark.parametrize("p", (0.0, 0.2))
@pytest.mark.parametrize("x_dtype, a_dtype", ((torch.float32, torch.float32), (torch.float16, torch.float32),
                                              (torch.bfloat16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16)))
def test_group_kernels_match_reference(p, x_dtype, a_dtype):
    # rank 100: the rank tile of 128 and its own launch configurations (kernels/lora.py::_fits)
    for rows, in_features, ranks in ((70, 100, (8, 16, 5)), (3, 130, (16,)), (129, 64, (32, 4)), (40, 72, (100,))):
        x, As, Bs, biases, grads = group_inputs(rows, in_features, ranks, x_dtype, a_dtype)
        seeds = [11 + i for i in range(len(ranks))]
        scales = [0.5 + i for i in range(len(ranks))]
        with use_backend("triton"):
            deltas, _ = ops.lora_deltas(x, As, Bs, scales, p, seeds, [b for b in biases if b is not None],
                                        [b is not None for b in biases])
            leaves = [x, *As, *Bs, *(b for b in biases if b is not None)]
            ours = torch.autograd.grad(deltas, leaves, grads)
        x64 = x.detach().double().requires_grad_()
        leaves64 = [t.detach().double().requires_grad_() for t in leaves[1:]]
        As64, Bs64 = leaves64[:len(ranks)], leaves64[len(ranks):2 * len(ranks)]
        rest = iter(leaves64[2 * len(ranks):])
        biases64 = [next(rest) if b is not None else None for b in biases]
        expected = [lora_delta_ref(x64, A, B, s, p, seed, b)
                    for A, B, s, seed, b in zip(As64, Bs64, scales, seeds, biases64)]
        theirs = torch.autograd.grad(expected, [x64, *leaves64], [g.double() for g in grads])
        tolerance = max(TOLERANCE[x_dtype], TOLERANCE[a_dtype])
        for delta, reference in zip(deltas, expected):
            assert delta.dtype == a_dtype
            assert rel_error(delta, reference) < tolerance
        assert ours[0].dtype == x_dtype
        for grad, reference in zip(ours, theirs):
            assert rel_error(grad, reference) < 2 * tolerance


def test_dropout_mask_in_the_kernels_is_the_reference_mask():
    from fastft.reference.lora import dropout_keep_ref

    x = torch.randn(40, 72, requires_grad=True)
    A, B = torch.randn(16, 72), torch.randn(8, 16)
    with use_backend("triton"):
        delta, _ = ops.lora_delta(x, A, B, 1.0, 0.5, 2**31 + 9, None)
        delta.sum().backward()
    assert torch.equal(x.grad != 0, dropout_keep_ref(x.numel(), 0.5, 2**31 + 9).view(40, 72))
