"""fastft::fused_linear_logprobs (and the row kernel under it) against the plain-torch reference
(fastft/reference/logprobs.py): values and gradients on ragged shapes, every dtype, ignored rows, entropy, no-grad
mode, gradcheck / opcheck, bad input."""

import pytest
import torch

from conftest import TOLERANCE, rel_error
from fastft.losses import fused_linear_cross_entropy, fused_linear_logprobs
from fastft.ops import logprobs as ops
from fastft.ops import use_backend
from fastft.ops.routing import dispatch
from fastft.reference.logprobs import fused_linear_logprobs_ref, logprob_rows_ref


def make(dtype, tokens=(3, 41), hidden=24, vocab=1001, bias=True, seed=0, ignored=7):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.4).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, tokens, generator=g)
    labels.view(-1)[:ignored] = -100
    labels.view(-1)[-2] = -100
    return h, w, b, labels


def reference(h, w, b, labels):
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    b64 = None if b is None else b.detach().double().requires_grad_()
    lp, ent, _ = fused_linear_logprobs_ref(h64.reshape(-1, h.shape[-1]), w64, b64, labels.reshape(-1))
    return lp.reshape(labels.shape), ent.reshape(labels.shape), [t for t in (h64, w64, b64) if t is not None]


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("bias", (True, False))
def test_values_and_gradients_match_reference(backend, dtype, bias):
    h, w, b, labels = make(dtype, bias=bias)
    leaves = [t for t in (h, w, b) if t is not None]
    lp, ent = fused_linear_logprobs(h, w, labels, bias=b, entropy=True)
    elp, eent, leaves64 = reference(h, w, b, labels)
    g = torch.Generator().manual_seed(1)
    glp, gent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    tol = TOLERANCE[dtype] if dtype != torch.float64 else 1e-10
    # bf16 / fp16 inputs: the reference sees the same rounded inputs, the op accumulates in fp32
    tol = max(tol, 1e-5)
    assert lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_error(lp, elp) < tol and rel_error(ent, eent) < tol
    assert (lp[labels == -100] == 0).all() and (ent[labels == -100] == 0).all()
    ours = torch.autograd.grad((lp * glp.to(lp.dtype)).sum() + (ent * gent.to(ent.dtype)).sum(), leaves)
    theirs = torch.autograd.grad((elp * glp.double()).sum() + (eent * gent.double()).sum(), leaves64)
    for a, e in zip(ours, theirs):
        assert a.dtype == dtype and rel_error(a, e) < (1e-2 if dtype in (torch.bfloat16, torch.float16) else tol)
    assert (ours[0][labels == -100] == 0).all()


@pytest.mark.parametrize("dtype", (torch.float64, torch.float32, torch.bfloat16, torch.float16))
@pytest.mark.parametrize("bias", (True, False))
def test_frozen_head_takes_the_hidden_gradient_in_forward(backend, dtype, bias, monkeypatch):
    """A frozen head (weight and bias without gradient): the forward also takes d logprob / d hidden, so a loss on
    the log-probabilities backpropagates without another head GEMM (the backward op never runs); a loss through the
    entropy recomputes as with a trainable head. Values and gradients are the reference's either way."""
    h, w, b, labels = make(dtype, bias=bias)
    w.requires_grad_(False)
    if b is not None:
        b.requires_grad_(False)
    recomputes = []
    backward_op = ops.fused_linear_logprobs_backward
    monkeypatch.setattr(ops, "fused_linear_logprobs_backward", lambda *a: recomputes.append(1) or backward_op(*a))
    elp, eent, leaves64 = reference(h, w, b, labels)
    g = torch.Generator().manual_seed(1)
    glp, gent = torch.randn(labels.shape, generator=g), torch.randn(labels.shape, generator=g)
    tol = {torch.float64: 1e-10, torch.float32: 1e-5}.get(dtype, 1e-2)
    for through_entropy in (False, True):
        lp, ent = fused_linear_logprobs(h, w, labels, bias=b, entropy=True)
        assert rel_error(lp, elp) < max(tol, 1e-5) and rel_error(ent, eent) < max(tol, 1e-5)
        loss, expected_loss = (lp * glp.to(lp.dtype)).sum(), (elp * glp.double()).sum()
        if through_entropy:
            loss, expected_loss = loss + (ent * gent.to(ent.dtype)).sum(), expected_loss + (eent * gent.double()).sum()
        (grad,) = torch.autograd.grad(loss, [h])
        (expected,) = torch.autograd.grad(expected_loss, [leaves64[0]], retain_graph=True)
        assert grad.dtype == dtype and rel_error(grad, expected) < tol
        assert (grad[labels == -100] == 0).all()
        assert recomputes == ([1] if through_entropy else [])
    with torch.no_grad():  # nothing to differentiate: no d logprob / d hidden taken
        assert not ops.fused_linear_logprobs(h.reshape(-1, h.shape[-1]), w, b, labels.reshape(-1), -100, False,
                                             False)[3].numel()


@pytest.mark.parametrize("vocab", (1, 17, 1001))
def test_row_kernel_matches_reference(backend, vocab):
    """The native row step (AVX-512 / AVX2 / scalar as the CPU allows) on a tile with large offsets, ragged V."""
    g = torch.Generator().manual_seed(vocab)
    z = torch.randn(37, vocab, generator=g) * 3 + torch.linspace(-60, 60, 37).unsqueeze(1)
    labels = torch.randint(0, vocab, (37,), generator=g)
    glp, gent = torch.randn(37, generator=g), torch.randn(37, generator=g)
    ours_z, ref_z = z.clone(), z.double()
    lp, ent, top = dispatch("logprob_rows", "cpu", ours_z, labels, True, glp, gent)
    elp, eent, etop = logprob_rows_ref(ref_z, labels, True, glp.double(), gent.double())
    assert rel_error(lp, elp) < 1e-5 and rel_error(top, etop) < 1e-5
    assert (ent - eent).abs().max() < 1e-5 * max(1.0, float(eent.abs().max()))  # 0 when vocab = 1
    assert rel_error(ours_z, ref_z) < 1e-5
    lp_only, none, _ = dispatch("logprob_rows", "cpu", z.clone(), labels, False, None, None)
    assert none is None and rel_error(lp_only, elp) < 1e-5


def test_many_chunks_and_ignored_rows_skip_the_head(monkeypatch):
    """Ignored rows never reach the logits GEMM (forward or backward); chunking does not change the result."""
    rows_seen = []
    logits = ops._logits
    monkeypatch.setattr(ops, "_logits", lambda h, *a: rows_seen.append(h.shape[0]) or logits(h, *a))
    monkeypatch.setattr(ops, "_TILE_BYTES", 10 * 1001 * 4)  # 10-row chunks
    monkeypatch.setattr(ops, "_WEIGHT_GRAD_TILE_BYTES", 15 * 1001 * 4)  # 15-row chunks in a backward taking d W
    h, w, b, labels = make(torch.float32, ignored=100)
    lp = fused_linear_logprobs(h, w, labels, bias=b)
    valid = int((labels != -100).sum())
    assert sum(rows_seen) == valid and max(rows_seen) == 10
    rows_seen.clear()
    lp.sum().backward()
    assert sum(rows_seen) == valid and max(rows_seen) == 15
    elp, _, leaves64 = reference(h, w, b, labels)
    elp.sum().backward()
    assert rel_error(lp, elp) < 1e-5 and rel_error(h.grad, leaves64[0].grad) < 1e-5
    assert rel_error(w.grad, leaves64[1].grad) < 1e-5
    rows_seen.clear()
    loss = fused_linear_cross_entropy(h, w, labels, bias=b)
    assert sum(rows_seen) == valid  # the cross-entropy shares the op: one pass over the valid rows
    assert rel_error(loss, -elp.sum() / valid) < 1e-5


def test_no_grad_mode_keeps_nothing():
    h, w, b, labels = make(torch.float32)
    expected = fused_linear_logprobs(h, w, labels, bias=b)
    with torch.no_grad():
        lp, ent = fused_linear_logprobs(h, w, labels, bias=b, entropy=True)
    assert lp.grad_fn is None and ent.grad_fn is None and torch.equal(lp, expected.detach())
    frozen = fused_linear_logprobs(h.detach(), w.detach(), labels, bias=b.detach())
    assert frozen.grad_fn is None and torch.equal(frozen, lp)


def test_only_the_gradients_asked_for():
    h, w, b, labels = make(torch.float32)
    w.requires_grad_(False)
    lp = fused_linear_logprobs(h, w, labels, bias=b)
    gh, gb = torch.autograd.grad(lp.sum(), [h, b])
    assert gh.shape == h.shape and gb.shape == b.shape and w.grad is None


def test_top_logprob_marks_the_most_likely_token():
    h, w, b, labels = make(torch.float32)
    out = fused_linear_logprobs(h, w, labels, bias=b, details=True)
    logits = torch.nn.functional.linear(h.detach(), w.detach(), b.detach())
    valid = labels != -100
    expected_top = logits.log_softmax(-1).max(-1).values
    assert out.entropy is None and rel_error(out.top[valid], expected_top[valid]) < 1e-5
    argmax_labels = torch.where(valid, logits.argmax(-1), -100)
    assert (fused_linear_logprobs(h, w, argmax_labels, bias=b, details=True).logprob >= out.top)[valid].all()


def test_all_rows_ignored():
    h, w, b, labels = make(torch.float32, ignored=200)
    lp, ent = fused_linear_logprobs(h, w, labels, bias=b, entropy=True)
    assert (lp == 0).all() and (ent == 0).all()
    (lp.sum() + ent.sum()).backward()
    assert (h.grad == 0).all() and (w.grad == 0).all()


def test_gradcheck_and_opcheck():
    h, w, b, labels = make(torch.float64, tokens=(6,), hidden=5, vocab=11, ignored=2)
    fn = lambda x, y, z: fused_linear_logprobs(x, y, labels, bias=z, entropy=True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (h, w, b))
    assert torch.autograd.gradcheck(lambda x, y: fused_linear_logprobs(x, y, labels), (h, w))
    frozen = w.detach(), b.detach()  # the hidden gradient taken in forward
    assert torch.autograd.gradcheck(lambda x: fused_linear_logprobs(x, *frozen[:1], labels, bias=frozen[1]), (h,))
    flat = labels.reshape(-1)
    with use_backend("native"):
        for hidden_grad_in_forward in (False, True):
            torch.library.opcheck(torch.ops.fastft.fused_linear_logprobs.default,
                                  (h.float(), w.float().detach(), b.float().detach(), flat, -100, True,
                                   hidden_grad_in_forward))
        torch.library.opcheck(torch.ops.fastft.fused_linear_nll.default,
                              (h, w, b, flat, -100, torch.tensor(4.0, dtype=torch.float64), True, True, True))


def test_bad_input():
    h, w, b, labels = make(torch.float32)
    bad = labels.clone()
    bad[0, 9] = 1001
    with pytest.raises(ValueError, match="labels must be in \\[0, 1001\\)"):
        fused_linear_logprobs(h, w, bad)
    bad[0, 9] = -5
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_logprobs(h, w, bad)
    with pytest.raises(ValueError, match="labels must be integer"):
        fused_linear_logprobs(h, w, labels.float())
    with pytest.raises(ValueError, match="labels must be integer with shape"):
        fused_linear_logprobs(h, w, labels[:, :-1])
    with pytest.raises(ValueError, match="weight must be"):
        fused_linear_logprobs(h, w[:, :-1], labels)
    with pytest.raises(ValueError, match="bias must have shape"):
        fused_linear_logprobs(h, w, labels, bias=b[:-1])
    with pytest.raises(TypeError, match="entropy must be a bool"):
        fused_linear_logprobs(h, w, labels, entropy=1)
    with pytest.raises(TypeError, match="hidden must be a floating tensor"):
        fused_linear_logprobs(h.long(), w, labels)
