"""kernels/logprobs.py under the Triton interpreter, through fastft::fused_linear_logprobs (and the fused
cross-entropy) with the triton backend, against the plain-torch reference (fp64)."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from conftest import rel_error  # noqa: E402
from fastft.losses import fused_linear_cross_entropy, fused_linear_logprobs  # noqa: E402
from fastft.ops import use_backend  # noqa: E402
from fastft.reference.logprobs import fused_linear_logprobs_ref  # noqa: E402


@pytest.mark.parametrize("vocab", (5, 3001))  # one ragged tile; three tiles of 1024, the last one ragged
def test_kernel_matches_reference(vocab):
    g = torch.Generator(torch.get_default_device()).manual_seed(vocab)
    tokens = 7
    h = torch.randn(tokens, 24, generator=g).requires_grad_()
    w = (0.4 * torch.randn(vocab, 24, generator=g)).requires_grad_()
    b = torch.randn(vocab, generator=g).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[2] = -100
    glp, gent = torch.linspace(0.5, 1.5, tokens), torch.linspace(-1.0, 1.0, tokens)
    with use_backend("triton"):
        out = fused_linear_logprobs(h, w, labels, bias=b, entropy=True, details=True)
        ours = torch.autograd.grad((out.logprob * glp).sum() + (out.entropy * gent).sum(), [h, w, b])
        loss = fused_linear_cross_entropy(h, w, labels, bias=b)
        ours_ce = torch.autograd.grad(loss, [h, w, b])
        frozen = fused_linear_logprobs(h, w.detach(), labels, bias=b.detach())  # hidden gradient taken in forward
        (ours_frozen,) = torch.autograd.grad((frozen * glp).sum(), [h])
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    lp, ent, top = fused_linear_logprobs_ref(*leaves[:2], leaves[2], labels)
    theirs = torch.autograd.grad((lp * glp.double()).sum() + (ent * gent.double()).sum(), leaves, retain_graph=True)
    (expected_frozen,) = torch.autograd.grad((lp * glp.double()).sum(), leaves[:1], retain_graph=True)
    assert rel_error(ours_frozen, expected_frozen) < 1e-5
    assert rel_error(out.logprob, lp) < 1e-5 and rel_error(out.entropy, ent) < 1e-5 and rel_error(out.top, top) < 1e-5
    for a, e in zip(ours, theirs):
        assert rel_error(a, e) < 1e-5
    valid = labels != -100
    expected_ce = -lp.sum() / valid.sum()
    assert rel_error(loss, expected_ce) < 1e-5
    for a, e in zip(ours_ce, torch.autograd.grad(expected_ce, leaves)):
        assert rel_error(a, e) < 1e-5
