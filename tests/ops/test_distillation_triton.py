"""kernels/distillation.py under the Triton interpreter, through fastft's fused distillation loss with the triton
backend, against the plain-torch reference (fp64)."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("FASTFT_TEST_DEVICE") != "cuda":
    pytest.skip("Triton kernels run on CPU only under TRITON_INTERPRET=1 (set before triton is imported), on GPUs "
                "with FASTFT_TEST_DEVICE=cuda",
                allow_module_level=True)

pytestmark = pytest.mark.triton_interpreter  # run in their own process: `make test`, gpu_check.sh

from conftest import rel_error  # noqa: E402
from fastft.losses import fused_linear_distillation  # noqa: E402
from fastft.ops import use_backend  # noqa: E402
from fastft.reference.distillation import distillation_ref  # noqa: E402



@pytest.mark.parametrize("beta", (0.0, 0.1, 0.5, 1.0))
@pytest.mark.parametrize("temperature,alpha", ((1.0, 1.0), (2.0, 0.5), (4.0, 0.0)))
def test_kernel_matches_reference(beta, temperature, alpha):
    g = torch.Generator(torch.get_default_device()).manual_seed(0)
    tokens, vocab = 6, 3001  # 3 vocabulary tiles of 1024, the last one ragged
    # logits of std ~1.5: fp32 gradients of a sharper softmax cancel in the centring sum on any fp32 path
    sh = (0.3 * torch.randn(tokens, 24, generator=g)).requires_grad_()
    sw = torch.randn(vocab, 24, generator=g).requires_grad_()
    th, tw = 0.3 * torch.randn(tokens, 40, generator=g), torch.randn(vocab, 40, generator=g)
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[1] = -100
    grad = torch.linspace(0.5, 1.5, tokens)
    with use_backend("triton"):
        loss = fused_linear_distillation(sh, sw, th, tw, labels, beta=beta, temperature=temperature, alpha=alpha,
                                         scale_by_t2=True, reduction="none")
        ours = torch.autograd.grad(loss, [sh, sw], grad)
    sh64, sw64 = (t.detach().double().requires_grad_() for t in (sh, sw))
    expected = distillation_ref(sh64, sw64, th.double(), tw.double(), labels, beta=beta, temperature=temperature,
                                alpha=alpha, scale_by_t2=True, reduction="none", dtype=torch.float64)
    theirs = torch.autograd.grad(expected, [sh64, sw64], grad.double())
    assert rel_error(loss, expected) < 1e-5
    for a, b in zip(ours, theirs):
        assert rel_error(a, b) < 1e-5


def test_kernel_is_used_and_handles_extreme_logits():
    from fastft.kernels import distillation as kernels

    zs = torch.tensor([[80.0, -80.0, 0.0] * 500, [0.0] * 1500])
    zt = torch.tensor([[-80.0, 80.0, 1.0] * 500, [1.0] * 1500])
    expected_zs = zs.clone()
    soft = kernels.distill_soft_rows(zs, zt, 1.0, 0.5, 1.0, want_grad=False)
    assert torch.equal(zs, expected_zs)  # no gradient asked: the logits stay
    s_logp, t_logp = zs.double().log_softmax(-1), zt.double().log_softmax(-1)
    m = torch.logaddexp(s_logp + torch.tensor(0.5).log(), t_logp + torch.tensor(0.5).log())
    reference = 0.5 * (t_logp.exp() * (t_logp - m)).sum(-1) + 0.5 * (s_logp.exp() * (s_logp - m)).sum(-1)
    assert torch.allclose(soft.double(), reference, rtol=1e-5, atol=1e-6)


def test_grid_covers_the_gpu_with_vocabulary_slices():
    """A chunk of ~100 rows at Llama-3's vocabulary launches >= 4 programs per SM of a 132-SM GPU, each slice whole
    1024-wide tiles; the test shapes above (V = 3001, 6 rows) run 3 slices a row, so the partial combination is
    what they check."""
    from fastft.kernels import distillation as kernels

    slices, length = kernels.slices_per_row(96, 128256)
    assert 96 * slices >= 4 * 132 and length % 1024 == 0 and slices * length >= 128256 > (slices - 1) * length
    assert kernels.slices_per_row(6, 3001) == (3, 1024)
    assert kernels.slices_per_row(4096, 128256) == (1, 126 * 1024)
