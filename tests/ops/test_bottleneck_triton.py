"""kernels/bottleneck.py under the Triton interpreter, through fastft::bottleneck_adapter with the triton backend."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from conftest import rel_error  # noqa: E402
from fastft.ops import bottleneck as ops  # noqa: E402
from fastft.ops import use_backend  # noqa: E402
from fastft.reference.bottleneck import ACTIVATIONS, bottleneck_adapter_ref  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}



def run(x, args, activation, layer_norm, grad):
    out = ops.bottleneck_adapter(x, args["w_down"], args["b_down"], args["w_up"], args["b_up"], activation, 0.7,
                                 args["residual"], args["ln_weight"], args["ln_bias"], layer_norm, 1e-5)[0]
    leaves = [x] + [v for v in args.values() if v is not None]
    return out, torch.autograd.grad(out, leaves, grad)


def inputs(rows, hidden, r, dtype, layer_norm, residual):
    g = torch.Generator(torch.get_default_device()).manual_seed(rows + hidden + r)

    def rand(*shape, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).requires_grad_()

    x = rand(rows, hidden)
    args = dict(w_down=rand(r, hidden, std=0.2), b_down=rand(r), w_up=rand(hidden, r, std=0.2), b_up=rand(hidden),
                residual=rand(rows, hidden) if residual else None,
                ln_weight=rand(hidden) if layer_norm else None, ln_bias=rand(hidden) if layer_norm else None)
    return x, args


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float16, torch.bfloat16))
def test_kernels_match_reference(activation, dtype):
    for rows, hidden, r, layer_norm, residual in ((70, 100, 20, False, False), (5, 33, 64, True, True)):
        x, args = inputs(rows, hidden, r, dtype, layer_norm, residual)
        grad = torch.randn(rows, hidden, generator=torch.Generator(torch.get_default_device()).manual_seed(3)).to(dtype)
        with use_backend("triton"):
            out, grads = run(x, args, activation, layer_norm, grad)
        x64 = x.detach().double().requires_grad_()
        a64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in args.items()}
        expected = bottleneck_adapter_ref(x64, activation=activation, scale=0.7, layer_norm=layer_norm, **a64)
        expected_grads = torch.autograd.grad(expected, [x64] + [v for v in a64.values() if v is not None],
                                             grad.double())
        assert out.dtype == dtype
        assert rel_error(out, expected) < TOLERANCE[dtype]
        for ours, theirs in zip(grads, expected_grads):
            assert rel_error(ours, theirs) < 2 * TOLERANCE[dtype]
