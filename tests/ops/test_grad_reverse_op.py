"""fastft::grad_reverse: identity forward, -lam * grad backward, nothing saved, one torch.compile graph."""

import pytest
import torch

from fastft.domain import dann_lambda, grad_reverse
from fastft.nn import GradientReversal


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float64))
@pytest.mark.parametrize("lam", (0.0, 0.3, 2.0))
def test_forward_is_identity_and_gradient_is_reversed_and_scaled(dtype, lam):
    x = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    dy = torch.randn(5, 7, dtype=dtype)
    y = grad_reverse(x, lam)
    assert torch.equal(y, x) and y.dtype == dtype
    (dx,) = torch.autograd.grad(y, [x], dy)
    assert torch.equal(dx, dy * -lam)


def test_gradcheck_of_minus_lam():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, dtype=torch.float64)
    # d/dx sum(w * grl(x)) = -lam * w, which gradcheck's numerical derivative (+w) contradicts unless lam = -1
    (dx,) = torch.autograd.grad((w * grad_reverse(x, 0.5)).sum(), [x])
    assert torch.equal(dx, -0.5 * w)
    torch.library.opcheck(torch.ops.fastft.grad_reverse.default, (x, 0.5))


def test_saves_nothing_for_backward():
    saved = []
    x = torch.randn(4, 8, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = grad_reverse(x, 1.0)
    assert saved == []
    y.sum().backward()
    assert torch.equal(x.grad, -torch.ones(4, 8))


def test_compiles_as_one_graph():
    layer = torch.nn.Linear(8, 3)
    reversal = GradientReversal(0.7)

    def f(x):
        return layer(reversal(x.relu())).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    x = torch.randn(4, 8, requires_grad=True)
    (expected,) = torch.autograd.grad(f(x), [x])
    (got,) = torch.autograd.grad(compiled(x), [x])
    assert torch.allclose(got, expected)
    explanation = torch._dynamo.explain(f)(x)
    assert explanation.graph_count == 1 and explanation.graph_break_count == 0


def test_dann_schedule_and_bad_input():
    assert dann_lambda(0.0) == 0.0
    assert abs(dann_lambda(1.0) - (2 / (1 + torch.exp(torch.tensor(-10.0, dtype=torch.float64))) - 1)) < 1e-15
    assert abs(dann_lambda(0.5, gamma=4.0) - 0.7615941559557649) < 1e-12  # tanh(1)
    with pytest.raises(ValueError, match="progress must be a finite real number in"):
        dann_lambda(1.5)
    with pytest.raises(ValueError, match="lam must be a finite real number in"):
        grad_reverse(torch.randn(2), -1.0)
    with pytest.raises(TypeError, match="x must be a floating tensor"):
        grad_reverse(torch.arange(3), 1.0)
