"""fastft::lora_down and the LoRA terms built on it (one adapter and groups) and fastft::lora_dropout vs the
reference; the dropout's statistics."""

import pytest
import torch

from conftest import TOLERANCE, rel_error
from fastft.ops import lora as ops
from fastft.reference import lora as ref


def run(x, A, B, bias, scale, p, seed, grad):
    delta, _ = ops.lora_delta(x, A, B, scale, p, seed, bias)
    delta.backward(grad)
    return delta


@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("p", (0.0, 0.1))
@pytest.mark.parametrize("shape", ((1, 64, 48, 8), (3, 77, 130, 16), (17, 40, 33, 4)))
def test_lora_delta_matches_reference(backend, x_dtype, p, shape):
    rows, in_features, out_features, rank = shape
    x = torch.randn(2, rows, in_features).to(x_dtype).requires_grad_()
    A = torch.randn(rank, in_features, requires_grad=True)  # peft keeps adapters in fp32
    B = torch.randn(out_features, rank, requires_grad=True)
    bias = torch.randn(out_features, requires_grad=True)
    grad = torch.randn(2, rows, out_features)
    delta = run(x, A, B, bias, 0.75, p, 1234, grad)

    x64 = x.detach().double().requires_grad_()
    A64, B64, b64 = (t.detach().double().requires_grad_() for t in (A, B, bias))
    expected = ref.lora_delta_ref(x64, A64, B64, 0.75, p, 1234, b64)  # x64 holds x's values exactly
    expected.backward(grad.double())
    assert delta.dtype == torch.float32 and delta.shape == (2, rows, out_features)
    assert rel_error(delta, expected) < 1e-5
    assert x.grad.dtype == x_dtype
    assert rel_error(x.grad, x64.grad) < TOLERANCE[x_dtype]
    for ours, theirs in ((A.grad, A64.grad), (B.grad, B64.grad), (bias.grad, b64.grad)):
        assert rel_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("p", (0.0, 0.1))
@pytest.mark.parametrize("x_dtype", (torch.float32, torch.bfloat16))
def test_group_matches_reference_per_adapter(backend, p, x_dtype):
    """Three adapters reading one x (ragged ranks, a bias on two, own scales and seeds) in one op call."""
    ranks, in_features = (8, 16, 3), 70
    x = torch.randn(2, 9, in_features).to(x_dtype).requires_grad_()
    As = [torch.randn(r, in_features, requires_grad=True) for r in ranks]
    Bs = [torch.randn(20 + i, r, requires_grad=True) for i, r in enumerate(ranks)]
    biases = [torch.randn(20, requires_grad=True), None, torch.randn(22, requires_grad=True)]
    scales, seeds = [0.5, 2.0, 1.5], [3, 4, 2**32 - 1]
    grads = [torch.randn(2, 9, B.shape[0]) for B in Bs]
    deltas, u = ops.lora_deltas(x, As, Bs, scales, p, seeds, [biases[0], biases[2]], [True, False, True])
    assert u.shape == (18, sum(ranks))
    leaves = [x, *As, *Bs, biases[0], biases[2]]
    ours = torch.autograd.grad(deltas, leaves, grads)

    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, As64, Bs64 = leaves64[0], leaves64[1:4], leaves64[4:7]
    biases64 = [leaves64[7], None, leaves64[8]]
    expected = [ref.lora_delta_ref(x64, *args) for args in zip(As64, Bs64, scales, (p,) * 3, seeds, biases64)]
    theirs = torch.autograd.grad(expected, leaves64, [g.double() for g in grads])
    for delta, reference in zip(deltas, expected):
        assert rel_error(delta, reference) < 1e-5
    assert ours[0].dtype == x_dtype and rel_error(ours[0], theirs[0]) < TOLERANCE[x_dtype]
    for grad, reference in zip(ours[1:], theirs[1:]):
        assert rel_error(grad, reference) < 1e-5


def test_group_gradcheck(backend):
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    As = [torch.randn(r, 24, dtype=torch.float64, requires_grad=True) for r in (4, 2)]
    Bs = [torch.randn(10, r, dtype=torch.float64, requires_grad=True) for r in (4, 2)]
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    fn = lambda x, A0, A1, B0, B1, b: ops.lora_deltas(  # noqa: E731
        x, [A0, A1], [B0, B1], [0.5, 2.0], 0.3, [99, 100], [b], [False, True])[0]
    assert torch.autograd.gradcheck(fn, (x, *As, *Bs, bias))


def test_group_bad_input():
    x, A, B = torch.randn(4, 8), torch.randn(2, 8), torch.randn(5, 2)
    with pytest.raises(ValueError, match="non-empty lists of one length"):
        ops.lora_deltas(x, [A, A], [B], [1.0, 1.0], 0.0, [1, 2], [], [False, False])
    with pytest.raises(ValueError, match="one bias per True in has_bias"):
        ops.lora_deltas(x, [A], [B], [1.0], 0.0, [1], [], [True])
    with pytest.raises(TypeError, match=r"lora_As\[1\] is torch.float64"):
        ops.lora_deltas(x, [A, A.double()], [B, B], [1.0, 1.0], 0.0, [1, 2], [], [False, False])
    with pytest.raises(ValueError, match=r"lora_As\[0\] must be \(rank, 8\)"):
        ops.lora_deltas(x, [torch.randn(2, 7)], [B], [1.0], 0.0, [1], [], [False])
    with pytest.raises(ValueError, match=r"lora_Bs\[0\] must be \(out_features, 2\)"):
        ops.lora_deltas(x, [A], [torch.randn(5, 3)], [1.0], 0.0, [1], [], [False])


def test_lora_delta_gradcheck(backend):
    x = torch.randn(3, 5, 24, dtype=torch.float64, requires_grad=True)
    A = torch.randn(4, 24, dtype=torch.float64, requires_grad=True)
    B = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(10, dtype=torch.float64, requires_grad=True)
    fn = lambda x, A, B, b: ops.lora_delta(x, A, B, 0.5, 0.3, 99, b)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, A, B, bias))


def test_lora_opcheck():
    x = torch.randn(6, 24, requires_grad=True)
    A = torch.randn(4, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.fastft.lora_down.default, (x, [A], 0.2, [5]))
    A2 = torch.randn(3, 24, requires_grad=True)
    torch.library.opcheck(torch.ops.fastft.lora_down.default, (x, [A, A2], 0.0, [5, 6]))
    torch.library.opcheck(torch.ops.fastft.lora_down.default, (x.detach().reshape(2, 3, 24), [A, A2], 0.3, [5, 6]))
    torch.library.opcheck(torch.ops.fastft.lora_dropout.default, (torch.randn(7, 9), 0.25, 3))
    du, A_cat = torch.randn(6, 7), torch.cat([A, A2]).detach()
    torch.library.opcheck(torch.ops.fastft.lora_down_backward.default,
                          (du, x.detach(), A_cat, [4, 3], 0.3, [5, 6], True, True))
    torch.library.opcheck(torch.ops.fastft.lora_down_backward.default,
                          (du, x.detach(), A_cat, [4, 3], 0.0, [5, 6], False, True))


@pytest.mark.parametrize("x_dtype,adapter_dtype", ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                                   (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)))
def test_dropout_gemms_over_row_chunks_match_the_reference(x_dtype, adapter_dtype):
    """With dropout, the C++ path drops x (and du A) chunk by chunk (about 2 MiB of rows each): 300 x 4099 rows span
    two or three chunks and a ragged tail; the masks are the whole tensor's (flat index), so forward, dx and dA agree
    with the reference path's, and dx is zero where both adapters dropped the element."""
    from fastft.ops import use_backend

    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 4099, generator=g).to(x_dtype)
    As = [(torch.randn(r, 4099, generator=g) * 0.02).to(adapter_dtype) for r in (4, 3)]
    Bs = [torch.randn(9, r, generator=g).to(adapter_dtype) for r in (4, 3)]
    grads = [torch.randn(300, 9, generator=g).to(adapter_dtype) for _ in Bs]
    results = {}
    for backend in ("native", "reference"):
        leaves = [x.clone().requires_grad_(), *(A.clone().requires_grad_() for A in As)]
        with use_backend(backend):
            deltas, u = ops.lora_deltas(leaves[0], leaves[1:], Bs, [1.0, 0.5], 0.25, [7, 2**33 + 1], [],
                                        [False, False])
            results[backend] = (u, *torch.autograd.grad(deltas, leaves, grads))
    for ours, theirs in zip(results["native"], results["reference"]):
        assert rel_error(ours, theirs) < (1e-5 if ours.dtype == torch.float32 else TOLERANCE[ours.dtype])
    kept = [ref.dropout_keep_ref(x.numel(), 0.25, seed).view(x.shape) for seed in (7, 2**33 + 1)]
    nonzero, either = results["native"][1] != 0, kept[0] | kept[1]
    assert not (nonzero & ~either).any()  # nothing where both adapters dropped the element
    assert nonzero.sum() >= 0.999 * either.sum()  # (two half-precision terms can cancel to 0)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16, torch.float64))
def test_native_dropout_mask_is_bit_exact(backend, dtype):
    x = torch.randn(301, 67).to(dtype)  # 20167 elements: vector blocks of 8 and a tail in each thread's range
    for p, seed in ((0.05, 0), (0.5, 1), (0.9, 2**31 + 7), (0.3, 2**32 - 1)):
        assert torch.equal(ops.lora_dropout(x, p, seed), ref.lora_dropout_ref(x, p, seed))


def test_dropout_statistics():
    n, p = 1_000_000, 0.1
    ones = torch.ones(n)
    first = ops.lora_dropout(ones, p, 11)
    kept = first != 0
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.float().mean().item() - (1 - p)) < 5 * sigma  # keep rate
    assert torch.allclose(first[kept], torch.full_like(first[kept], 1 / (1 - p)))  # scaling of kept values
    second = ops.lora_dropout(ones, p, 12) != 0  # a new call (seed) gives an independent mask
    both = (kept & second).float().mean().item()
    assert abs(both - (1 - p) ** 2) < 5 * sigma
    neighbours = (kept[:-1] & kept[1:]).float().mean().item()  # independent across adjacent elements
    assert abs(neighbours - (1 - p) ** 2) < 5 * sigma
    rows = kept.view(1000, 1000)  # ... and across rows / columns
    assert abs((rows[:-1] & rows[1:]).float().mean().item() - (1 - p) ** 2) < 5 * sigma * 2
    assert torch.equal(ops.lora_dropout(ones, p, 11), first)  # same seed, same mask


def test_backward_uses_the_forward_mask():
    x = torch.randn(50, 64, requires_grad=True)
    A = torch.randn(8, 64)
    B = torch.randn(16, 8)
    delta, _ = ops.lora_delta(x, A, B, 1.0, 0.5, 77, None)
    delta.sum().backward()
    kept = ref.dropout_keep_ref(x.numel(), 0.5, 77).view(50, 64)
    assert torch.equal(x.grad != 0, kept)
    assert torch.equal(ops.lora_delta(x, A, B, 1.0, 0.5, 77, None)[0], delta)


def test_bad_dropout_probability():
    with pytest.raises(ValueError, match=r"dropout p must be in \[0, 1\)"):
        ops.lora_dropout(torch.randn(4), 1.0, 0)
