"""kernels/ewc.py under the Triton interpreter (or on CUDA): the penalty and the gradient it adds vs the reference,
ragged sizes spanning several segments, mixed dtypes in one call."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from conftest import rel_error  # noqa: E402
from fastft.ewc import ewc_penalty_  # noqa: E402
from fastft.ops import use_backend  # noqa: E402


def lists(pairs, shapes, seed=0):
    g = torch.Generator(torch.get_default_device()).manual_seed(seed)
    out = ([], [], [], [])
    for (param_dtype, storage_dtype), shape in zip(pairs, shapes):
        p = torch.randn(shape, generator=g).to(param_dtype)
        out[0].append(p)
        out[1].append(torch.randn(shape, generator=g).to(param_dtype))
        out[2].append(torch.rand(shape, generator=g).to(storage_dtype))
        out[3].append((p.float() + torch.randn(shape, generator=g)).to(storage_dtype))
    return out


@pytest.mark.parametrize("pairs", (
    [(torch.float32, torch.float32)] * 3,
    [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)]))
def test_kernel_matches_reference(pairs):
    shapes = ((9000,), (7, 33), (1,))  # 9000: two segments, the second ragged
    params, grads, fisher, anchor = lists(pairs, shapes)
    results = {}
    for backend in ("triton", "reference"):
        g = [t.clone() for t in grads]
        with use_backend(backend):
            results[backend] = (ewc_penalty_(params, g, fisher, anchor, 3.5), g)
    assert rel_error(results["triton"][0], results["reference"][0]) < 1e-5
    for got, expected in zip(results["triton"][1], results["reference"][1]):
        # one rounding to the grad's dtype apart at most
        assert rel_error(got, expected) < (1e-5 if got.dtype == torch.float32 else 1e-2)
