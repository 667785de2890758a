"""kernels/routed_lora.py under the Triton interpreter, through fastft::routed_lora with the triton backend:
ragged adapter groups (empty adapters, rows routed to none, a segment over several tiles, ranks over 64), each
dtype pair of x and the adapters, forward and backward against the fp64 per-row formula."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from conftest import rel_error  # noqa: E402
from fastft.ops import use_backend  # noqa: E402
from fastft.ops.routed_lora import routed_lora  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def per_row(x, As, Bs, scales, route):
    rows = [x[m] @ As[g].t() @ Bs[g].t() * scales[g] if g >= 0 else x[m] @ As[0].t() @ Bs[0].t() * 0
            for m, g in enumerate(route.tolist())]
    return torch.stack(rows)


@pytest.mark.parametrize("x_dtype, a_dtype", ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)))
@pytest.mark.parametrize("want_x", (True, False))
def test_kernels_match_per_row_formula(x_dtype, a_dtype, want_x):
    # (rows, in, out, ranks, route): adapter 1 empty and unrouted rows; one adapter over 2 tiles; rank 100
    cases = ((45, 70, 33, (4, 8, 3), [(0, 2, -1, 0, 2)[i % 5] for i in range(45)]),
             (70, 40, 66, (16,), [0] * 70),
             (9, 24, 20, (100, 2), [1, 0, 0, 1, 0, 1, 1, 0, 0]))
    for rows, in_features, out_features, ranks, route in cases:
        g = torch.Generator(torch.get_default_device()).manual_seed(rows)
        route = torch.tensor(route)
        x = torch.randn(rows, in_features, generator=g).to(x_dtype).requires_grad_(want_x)
        As = [(torch.randn(r, in_features, generator=g) * 0.3).to(a_dtype).requires_grad_() for r in ranks]
        Bs = [(torch.randn(out_features, r, generator=g) * 0.3).to(a_dtype).requires_grad_() for r in ranks]
        dy = torch.randn(rows, out_features, generator=g).to(a_dtype)
        scales = [0.5 + i for i in range(len(ranks))]
        leaves = [*([x] if want_x else []), *As, *Bs]
        with use_backend("triton"):
            delta = routed_lora(x, As, Bs, scales, route)
            grads = torch.autograd.grad(delta, leaves, dy)
        leaves64 = [t.detach().double().requires_grad_() for t in (x, *As, *Bs)]
        n = len(ranks)
        expected = per_row(leaves64[0], leaves64[1:1 + n], leaves64[1 + n:], scales, route)
        expected_grads = torch.autograd.grad(expected, leaves64, dy.double(), materialize_grads=True)
        expected_grads = expected_grads[0 if want_x else 1:]
        tolerance = max(TOLERANCE[x_dtype], TOLERANCE[a_dtype])
        assert delta.dtype == a_dtype and rel_error(delta, expected) < tolerance
        for ours, theirs in zip(grads, expected_grads):
            if theirs.abs().max() == 0:
                assert ours.abs().max() == 0
            else:
                assert rel_error(ours, theirs) < tolerance


def test_no_routed_row():
    x = torch.randn(5, 16)
    As, Bs = [torch.randn(4, 16, requires_grad=True)], [torch.randn(8, 4, requires_grad=True)]
    with use_backend("triton"):
        delta = routed_lora(x, As, Bs, [1.0], torch.full((5,), -1))
        grads = torch.autograd.grad(delta, As + Bs, torch.ones(5, 8))
    assert delta.abs().max() == 0 and all(g.abs().max() == 0 for g in grads)
