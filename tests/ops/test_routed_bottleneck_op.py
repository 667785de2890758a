"""fastft::routed_bottleneck vs the row-by-row reference (forward and every gradient, fp64): sequential and parallel
adapters mixed in one call, an adapter without rows, rows routed to none, biases on some adapters only, each CPU
backend (the blocks run the bottleneck kernel entries: C++ for fp32 blocks of >= 1024 rows); gradcheck; bad input."""

import pytest
import torch

from conftest import rel_error
from fastft.formats.bottleneck import ACTIVATIONS
from fastft.ops.routed_bottleneck import routed_bottleneck
from fastft.reference.routed_bottleneck import routed_bottleneck_ref

HIDDEN, SIZES = 24, (4, 8, 3)
ACTS = ("relu", "silu", "gelu")
PARALLEL = [False, True, False]


def adapters(dtype, generator, hidden=HIDDEN, sizes=SIZES):
    w_downs = [torch.randn(r, hidden, generator=generator, dtype=dtype) * 0.3 for r in sizes]
    w_ups = [torch.randn(hidden, r, generator=generator, dtype=dtype) * 0.3 for r in sizes]
    b_downs = [torch.randn(sizes[0], generator=generator, dtype=dtype), None,
               torch.randn(sizes[2], generator=generator, dtype=dtype)]
    b_ups = [torch.randn(hidden, generator=generator, dtype=dtype), None, None]
    return [t.requires_grad_() if t is not None else None for t in (*w_downs, *b_downs, *w_ups, *b_ups)]


def call(fn, output, source, params, route, activations):
    w_downs, b_downs, w_ups, b_ups = params[0:3], params[3:6], params[6:9], params[9:12]
    if fn is routed_bottleneck:  # the op takes an empty tensor for "no bias"
        b_downs, b_ups = ([b if b is not None else params[0].new_empty(0) for b in bs] for bs in (b_downs, b_ups))
    return fn(output, source, w_downs, b_downs, w_ups, b_ups, activations, [0.5, 2.0, 1.0], PARALLEL, route)


@pytest.mark.parametrize("batch, seq", ((6, 5), (3, 400)))  # 1200 token rows: adapter 0's block takes the C++ kernels
def test_matches_row_by_row_reference(backend, batch, seq):
    g = torch.Generator().manual_seed(batch)
    output = torch.randn(batch, seq, HIDDEN, generator=g).requires_grad_()
    source = torch.randn(batch, seq, HIDDEN, generator=g).requires_grad_()
    params = adapters(torch.float32, g)
    task = torch.tensor([(0, 1, -1, 0, 1, 0)[i] for i in range(batch)])  # adapter 2: no rows
    route = task.repeat_interleave(seq)
    out = call(routed_bottleneck, output, source, params, route, [ACTIVATIONS.index(a) for a in ACTS])
    dy = torch.randn(out.shape, generator=g)
    leaves = [output, source, *(p for p in params if p is not None)]
    grads = torch.autograd.grad(out, leaves, dy)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    it = iter(leaves64[2:])
    params64 = [next(it) if p is not None else None for p in params]
    expected = call(routed_bottleneck_ref, leaves64[0].reshape(-1, HIDDEN), leaves64[1].reshape(-1, HIDDEN), params64,
                    route, list(ACTS))
    expected_grads = torch.autograd.grad(expected, leaves64, dy.double().reshape(-1, HIDDEN), materialize_grads=True)
    assert rel_error(out.reshape(-1, HIDDEN), expected) < 1e-5
    for ours, theirs in zip(grads, expected_grads):
        if theirs.abs().max() == 0:
            assert ours.abs().max() == 0
        else:
            assert rel_error(ours, theirs) < 1e-5


def test_gradcheck():
    """Small (each input element is one more evaluation); the blocks are under the C++ kernels' 1024 rows, so one
    backend covers it."""
    g = torch.Generator().manual_seed(5)
    output = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    source = torch.randn(6, 4, generator=g, dtype=torch.float64, requires_grad=True)
    params = adapters(torch.float64, g, hidden=4, sizes=(2, 3, 1))
    route = torch.tensor([0, 1, 1, -1, 2, 0])
    activations = [ACTIVATIONS.index(a) for a in ("gelu_tanh", "silu", "gelu")]
    present = [p for p in params if p is not None]

    def fn(output, source, *flat):
        it = iter(flat)
        return call(routed_bottleneck, output, source, [next(it) if p is not None else None for p in params], route,
                    activations)
    assert torch.autograd.gradcheck(fn, (output, source, *present))


def test_bad_input():
    g = torch.Generator().manual_seed(0)
    output, params = torch.randn(4, HIDDEN), adapters(torch.float32, g)
    with pytest.raises(ValueError, match=r"route values must be in \[-1, 3\)"):
        call(routed_bottleneck, output, output, params, torch.tensor([0, 3, 1, 1]), [0, 0, 0])
    with pytest.raises(ValueError, match="parallel adapters need source"):
        call(routed_bottleneck, output, None, params, torch.tensor([0, 1, 1, 1]), [0, 0, 0])
    with pytest.raises(ValueError, match="activations must be indices"):
        call(routed_bottleneck, output, output, params, torch.tensor([0, 1, 1, 1]), [0, 9, 0])
