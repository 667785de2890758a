"""fastft::routed_lora (forward and backward) on each CPU backend vs an fp64 per-row formula: ragged adapter
groups (ranks, row counts, empty adapters, rows routed to no adapter), every dtype of x and of the adapters;
gradcheck and opcheck of the native path; bad routes."""

import pytest
import torch

from conftest import TOLERANCE, rel_error
from fastft.ops.routed_lora import routed_lora

RANKS = (4, 8, 1, 16, 3)


def per_row(x, As, Bs, scales, route):
    """delta_m = scale_g x_m A_g^T B_g^T row by row in fp64 (0 for route -1, still in the graph): no grouping."""
    rows = []
    for m, g in enumerate(route.tolist()):
        rows.append(x[m] @ As[g].t() @ Bs[g].t() * scales[g] if g >= 0 else x[m] @ As[0].t() @ Bs[0].t() * 0)
    return torch.stack(rows)


def inputs(rows, in_features, out_features, route, x_dtype, a_dtype):
    g = torch.Generator().manual_seed(rows * 7 + in_features)
    x = torch.randn(rows, in_features, generator=g).to(x_dtype).requires_grad_()
    As = [(torch.randn(r, in_features, generator=g) * 0.3).to(a_dtype).requires_grad_() for r in RANKS]
    Bs = [(torch.randn(out_features, r, generator=g) * 0.3).to(a_dtype).requires_grad_() for r in RANKS]
    dy = torch.randn(rows, out_features, generator=g).to(a_dtype)
    return x, As, Bs, dy


ROUTES = {
    # adapters 2 and 4 get no rows, some rows get none
    "ragged": lambda rows: torch.tensor([(0, 3, -1, 1, 3, 0, 3)[i % 7] for i in range(rows)]),
    "one adapter": lambda rows: torch.full((rows,), 4),
    "no rows routed": lambda rows: torch.full((rows,), -1),
}


@pytest.mark.parametrize("x_dtype, a_dtype", ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                              (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16),
                                              (torch.float16, torch.float16), (torch.float64, torch.float64)))
@pytest.mark.parametrize("route_kind", tuple(ROUTES))
@pytest.mark.parametrize("shape", ((37, 70, 45), (5, 16, 130)))
def test_matches_per_row_formula(backend, x_dtype, a_dtype, route_kind, shape):
    rows, in_features, out_features = shape
    route = ROUTES[route_kind](rows)
    x, As, Bs, dy = inputs(rows, in_features, out_features, route, x_dtype, a_dtype)
    scales = [0.5, 2.0, 1.0, 0.25, 1.5]
    delta = routed_lora(x, As, Bs, scales, route)
    grads = torch.autograd.grad(delta, [x, *As, *Bs], dy)

    leaves64 = [t.detach().double().requires_grad_() for t in (x, *As, *Bs)]
    expected = per_row(leaves64[0], leaves64[1:6], leaves64[6:], scales, route)
    expected_grads = torch.autograd.grad(expected, leaves64, dy.double(), materialize_grads=True)
    tolerance = max(TOLERANCE[x_dtype], TOLERANCE[a_dtype])
    assert delta.dtype == a_dtype and delta.shape == (rows, out_features)
    assert rel_error(delta, expected) < tolerance
    assert grads[0].dtype == x_dtype and rel_error(grads[0], expected_grads[0]) < tolerance
    for g, ours, theirs in zip(range(10), grads[1:], expected_grads[1:]):
        assert ours.dtype == a_dtype
        if theirs.abs().max() == 0:  # an adapter without rows: exact zeros
            assert ours.abs().max() == 0, g
        else:
            assert rel_error(ours, theirs) < tolerance, g


def test_gradcheck_and_opcheck(backend):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(13, 6, dtype=torch.float64, generator=g, requires_grad=True)
    As = [torch.randn(r, 6, dtype=torch.float64, generator=g, requires_grad=True) for r in (2, 3, 1, 2)]
    Bs = [torch.randn(5, r, dtype=torch.float64, generator=g, requires_grad=True) for r in (2, 3, 1, 2)]
    route = torch.tensor([0, 2, 1, 1, -1, 0, 2, 2, 1, 0, -1, 2, 0])  # adapter 3: no rows
    scales = [0.5, 2.0, 1.0, 3.0]
    assert torch.autograd.gradcheck(lambda x, *w: routed_lora(x, list(w[:4]), list(w[4:]), scales, route),
                                    (x, *As, *Bs))
    torch.library.opcheck(torch.ops.fastft.routed_lora.default,
                          (x.detach(), [A.detach() for A in As], [B.detach() for B in Bs], scales, route))


def test_bad_route(backend):
    x, As, Bs, _ = inputs(4, 8, 6, None, torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"route values must be in \[-1, 5\)"):
        routed_lora(x, As, Bs, [1.0] * 5, torch.tensor([0, 5, 1, 1]))
    with pytest.raises(ValueError, match="route must be a 1-D int64 tensor with one entry per row of x"):
        routed_lora(x, As, Bs, [1.0] * 5, torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="one A, one B and one scale per adapter"):
        routed_lora(x, As, Bs[:4], [1.0] * 5, torch.tensor([0, 1, 1, 0]))
