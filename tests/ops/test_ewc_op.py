"""fastft::ewc_penalty (fastft.ewc.ewc_penalty_) on each CPU backend: the penalty and the gradient it adds vs
autograd of the plain formula lam / 2 * sum F (theta - theta*)^2 in fp64, over ragged shapes, mixed dtypes and
every storage dtype; bad input."""

import pytest
import torch

from conftest import rel_error
from fastft.ewc import ewc_penalty_

SHAPES = ((7,), (33, 65), (3, 5, 130), (70_001,), (1,))  # 70_001: more than one segment, ragged


def make(param_dtype, storage_dtype, seed=0, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(param_dtype) for s in shapes]
    grads = [torch.randn(s, generator=g).to(param_dtype) for s in shapes]
    fisher = [torch.rand(s, generator=g).to(storage_dtype) for s in shapes]
    anchor = [(p.double() + 0.5 * torch.randn(s, generator=g, dtype=torch.float64)).to(storage_dtype)
              for p, s in zip(params, shapes)]
    return params, grads, fisher, anchor


def autograd_expected(params, grads, fisher, anchor, lam):
    """(penalty, grad + d penalty / d theta) from autograd of the plain formula, in fp64."""
    leaves = [p.double().requires_grad_() for p in params]
    penalty = lam / 2 * sum((f.double() * (p - a.double()) ** 2).sum() for p, f, a in zip(leaves, fisher, anchor))
    dtheta = torch.autograd.grad(penalty, leaves)
    return penalty.detach(), [g.double() + d for g, d in zip(grads, dtheta)]


@pytest.mark.parametrize("param_dtype,storage_dtype,tol", [
    (torch.float64, torch.float64, 1e-12), (torch.float32, torch.float32, 1e-5), (torch.float32, torch.bfloat16, 1e-5),
    (torch.bfloat16, torch.bfloat16, 1e-2), (torch.bfloat16, torch.float32, 1e-2), (torch.float16, torch.float32, 1e-2),
    (torch.float64, torch.bfloat16, 1e-12)])
@pytest.mark.parametrize("lam", (0.0, 0.7, 250.0))
def test_penalty_and_gradient_match_autograd(backend, param_dtype, storage_dtype, tol, lam):
    params, grads, fisher, anchor = make(param_dtype, storage_dtype)
    expected_penalty, expected_grads = autograd_expected(params, grads, fisher, anchor, lam)
    penalty = ewc_penalty_(params, grads, fisher, anchor, lam)
    assert penalty.dtype == (torch.float64 if param_dtype == torch.float64 else torch.float32)
    assert rel_error(penalty, expected_penalty) < (1e-12 if param_dtype == torch.float64 else 1e-5)
    for g, e in zip(grads, expected_grads):
        assert g.dtype == param_dtype
        assert rel_error(g, e) < tol


def test_mixed_dtypes_in_one_call_match_the_reference(backend):
    lists = [make(pd, sd, seed=i, shapes=((129, 3), (1000,)))
             for i, (pd, sd) in enumerate(((torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32),
                                           (torch.float32, torch.float32)))]
    params, grads, fisher, anchor = ([t for parts in lists for t in parts[k]] for k in range(4))
    expected_penalty, expected_grads = autograd_expected(params, grads, fisher, anchor, 3.0)
    assert rel_error(ewc_penalty_(params, grads, fisher, anchor, 3.0), expected_penalty) < 1e-5
    for g, e in zip(grads, expected_grads):
        assert rel_error(g, e) < (1e-5 if g.dtype == torch.float32 else 1e-2)


def test_result_does_not_depend_on_thread_count():
    params, grads, fisher, anchor = make(torch.float32, torch.float32, shapes=((300_000,), (5,)))
    threads = torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        g = [t.clone() for t in grads]
        results.append((ewc_penalty_(params, g, fisher, anchor, 1.5), g))
    torch.set_num_threads(threads)
    assert torch.equal(results[0][0], results[1][0])
    assert all(torch.equal(a, b) for a, b in zip(results[0][1], results[1][1]))


def test_op_passes_opcheck():
    params, grads, fisher, anchor = make(torch.float32, torch.float32, shapes=((9, 4), (17,)))
    torch.library.opcheck(torch.ops.fastft.ewc_penalty.default, (params, grads, fisher, anchor, 0.5),
                          test_utils=("test_schema", "test_faketensor"))


def test_bad_input_names_the_argument():
    params, grads, fisher, anchor = make(torch.float32, torch.float32, shapes=((4, 3), (5,)))
    with pytest.raises(ValueError, match="lam must be a finite real number >= 0"):
        ewc_penalty_(params, grads, fisher, anchor, -1.0)
    with pytest.raises(ValueError, match="lam"):
        ewc_penalty_(params, grads, fisher, anchor, float("nan"))
    with pytest.raises(ValueError, match=r"fisher\[0\] must have its parameter's shape \(4, 3\)"):
        ewc_penalty_(params, grads, [torch.rand(3, 4), fisher[1]], anchor, 1.0)
    with pytest.raises(ValueError, match="anchor must have one tensor per parameter"):
        ewc_penalty_(params, grads, fisher, anchor[:1], 1.0)
    with pytest.raises(TypeError, match=r"grads\[1\] must have its parameter's dtype"):
        ewc_penalty_(params, [grads[0], grads[1].double()], fisher, anchor, 1.0)
    with pytest.raises(TypeError, match=r"fisher\[0\] must be fp32, bf16 or fp64"):
        ewc_penalty_(params, grads, [fisher[0].half(), fisher[1]], [anchor[0].half(), anchor[1]], 1.0)
    with pytest.raises(TypeError, match=r"anchor\[0\] must have its Fisher's dtype"):
        ewc_penalty_(params, grads, fisher, [anchor[0].bfloat16(), anchor[1]], 1.0)
    with pytest.raises(ValueError, match=r"grads\[0\] must be contiguous"):
        ewc_penalty_(params, [torch.randn(3, 4).t(), grads[1]], fisher, anchor, 1.0)
