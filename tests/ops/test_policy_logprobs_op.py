"""fastft::fused_linear_policy_logprobs (fastft.losses.fused_linear_policy_logprobs): the gradients taken in the
forward pass against autograd through the plain-torch reference (fastft/reference/logprobs.py) and the token-local
policy loss written from its formulas, in fp64; every loss type, ratios on- and off-policy, delta, the KL term
with and without bias correction, the entropy bonus, ignored rows, every dtype; the backward's hand-over (a scaled
loss) and its recompute (a loss that is not the predicted one, with a warning); no-grad mode; gradcheck / opcheck;
bad input."""

import warnings

import pytest
import torch

from conftest import TOLERANCE, rel_error
from fastft.losses import PolicyGradientTerms, fused_linear_logprobs, fused_linear_policy_logprobs
from fastft.ops import use_backend
from fastft.reference.logprobs import fused_linear_logprobs_ref


def make(dtype, tokens=(3, 29), hidden=16, vocab=301, seed=0, old=True, kl=True, entropy=True, **options):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*tokens, hidden, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) * 0.4).to(dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, tokens, generator=g)
    labels.view(-1)[:5] = -100
    with torch.no_grad():
        base = fused_linear_logprobs(h.double(), w.double(), labels, bias=b.double())
    noise = lambda scale: scale * torch.randn(tokens, generator=g, dtype=torch.float64)  # noqa: E731
    valid = (labels != -100).double()
    terms = PolicyGradientTerms(
        advantage=noise(1.0), token_weight=valid * (0.5 + torch.rand(tokens, generator=g, dtype=torch.float64)),
        old_logprob=base + noise(0.3) if old else None, kl_weight=0.05 * valid if kl else None,
        ref_logprob=base + noise(0.2) if kl else None, entropy_weight=-0.01 * valid if entropy else None,
        **options)
    return h, w, b, labels, terms


def policy_loss(logprob, entropy, terms: PolicyGradientTerms):
    """The loss `terms` describes, in plain torch (autograd takes its derivative)."""
    adv = terms.advantage.to(logprob.dtype)
    old = logprob.detach() if terms.old_logprob is None else terms.old_logprob.to(logprob.dtype)
    ratio = torch.exp(logprob - old)
    if terms.loss_type == "cispo":
        per_token = -torch.clamp(ratio, max=terms.epsilon_high).detach() * adv * logprob
    elif terms.loss_type == "sapo":
        tau = torch.where(adv > 0, terms.sapo_temperature_pos, terms.sapo_temperature_neg)
        per_token = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * adv
    else:
        capped = ratio if terms.delta is None else torch.clamp(ratio, max=terms.delta)
        clipped = torch.clamp(ratio, 1 - terms.epsilon_low, 1 + terms.epsilon_high)
        per_token = -torch.min(capped * adv, clipped * adv)
    loss = (per_token * terms.token_weight.to(logprob.dtype)).sum()
    if terms.kl_weight is not None:
        d = terms.ref_logprob.to(logprob.dtype) - logprob
        kl = torch.exp(d) - d - 1
        if terms.kl_bias_correction:
            kl = kl * ratio
        loss = loss + (kl * terms.kl_weight.to(logprob.dtype)).sum()
    if terms.entropy_weight is not None:
        loss = loss + (entropy * terms.entropy_weight.to(entropy.dtype)).sum()
    return loss


def reference_grads(h, w, b, labels, terms):
    leaves = [t.detach().double().requires_grad_() for t in (h, w, b)]
    lp, ent, _ = fused_linear_logprobs_ref(leaves[0].reshape(-1, h.shape[-1]), leaves[1], leaves[2],
                                           labels.reshape(-1))
    loss = policy_loss(lp.reshape(labels.shape), ent.reshape(labels.shape), terms)
    return loss, torch.autograd.grad(loss, leaves)


def fused_grads(h, w, b, labels, terms, scale=1.0):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the hand-over: no recompute
        out = fused_linear_policy_logprobs(h, w, labels, terms, bias=b, entropy=terms.entropy_weight is not None)
        loss = policy_loss(out.logprob, out.entropy, terms)
        return loss, torch.autograd.grad(loss * scale, (h, w, b))


CASES = [dict(loss_type="clip"), dict(loss_type="clip", delta=1.2, epsilon_high=0.28), dict(loss_type="cispo"),
         dict(loss_type="sapo"), dict(loss_type="clip", old=False), dict(loss_type="clip", kl_bias_correction=False),
         dict(loss_type="sapo", kl=False, entropy=False)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_gradients_match_reference_fp64(backend, case):
    h, w, b, labels, terms = make(torch.float64, **case)
    loss, ours = fused_grads(h, w, b, labels, terms)
    expected, theirs = reference_grads(h, w, b, labels, terms)
    assert rel_error(loss, expected) < 1e-12
    for a, e in zip(ours, theirs):
        assert rel_error(a, e) < 1e-10
    assert (ours[0][labels == -100] == 0).all()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
def test_gradients_match_reference_each_dtype(backend, dtype):
    h, w, b, labels, terms = make(dtype, delta=1.3)
    loss, ours = fused_grads(h, w, b, labels, terms)
    expected, theirs = reference_grads(h, w, b, labels, terms)
    tol = max(TOLERANCE[dtype], 1e-5)  # the reference sees the same rounded inputs; the op accumulates in fp32
    assert rel_error(loss, expected) < tol
    for a, e in zip(ours, theirs):
        assert a.dtype == dtype and rel_error(a, e) < (1e-2 if dtype != torch.float32 else tol)


def test_scaled_loss_hands_over_scaled_gradients():
    h, w, b, labels, terms = make(torch.float64)
    _, ours = fused_grads(h, w, b, labels, terms, scale=-2.5)
    _, theirs = reference_grads(h, w, b, labels, terms)
    for a, e in zip(ours, theirs):
        assert rel_error(a, -2.5 * e) < 1e-10


def test_other_loss_warns_and_recomputes():
    """The log-probabilities also enter an SFT term: the predicted gradient does not hold, the backward says so and
    recomputes; the gradients are still exact."""
    h, w, b, labels, terms = make(torch.float64)
    out = fused_linear_policy_logprobs(h, w, labels, terms, bias=b, entropy=True)
    loss = policy_loss(out.logprob, out.entropy, terms) - 0.1 * out.logprob.sum()
    with pytest.warns(UserWarning, match="recomputing the head"):
        ours = torch.autograd.grad(loss, (h, w, b))
    leaves = [t.detach().requires_grad_() for t in (h, w, b)]
    lp, ent = fused_linear_logprobs(leaves[0], leaves[1], labels, bias=leaves[2], entropy=True)
    theirs = torch.autograd.grad(policy_loss(lp, ent, terms) - 0.1 * lp.sum(), leaves)
    for a, e in zip(ours, theirs):
        assert rel_error(a, e) < 1e-12


def test_no_grad_and_frozen_head():
    h, w, b, labels, terms = make(torch.float32)
    with torch.no_grad():
        out = fused_linear_policy_logprobs(h, w, labels, terms, bias=b, entropy=True)
    lp, ent = fused_linear_logprobs(h.detach(), w.detach(), labels, bias=b.detach(), entropy=True)
    assert torch.equal(out.logprob, lp) and torch.equal(out.entropy, ent) and not out.logprob.requires_grad
    frozen = w.detach()
    _, (grad_h,) = (lambda o: (None, torch.autograd.grad(policy_loss(o.logprob, o.entropy, terms), (h,))))(
        fused_linear_policy_logprobs(h, frozen, labels, terms, bias=b.detach(), entropy=True))
    _, theirs = reference_grads(h, w, b, labels, terms)
    assert rel_error(grad_h, theirs[0]) < 1e-5


def test_all_rows_ignored():
    h, w, b, _, terms = make(torch.float32)
    labels = torch.full(h.shape[:-1], -100)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = fused_linear_policy_logprobs(h, w, labels, terms, bias=b, entropy=True)
        grads = torch.autograd.grad(policy_loss(out.logprob, out.entropy, terms), (h, w, b), allow_unused=True)
    assert not out.logprob.any() and not out.entropy.any()
    assert all(g is None or not g.any() for g in grads)


def test_gradcheck_and_opcheck():
    h, w, b, labels, terms = make(torch.float64, tokens=(7,), hidden=5, vocab=11)
    fn = lambda x, y, z: policy_loss(*fused_linear_policy_logprobs(x, y, labels, terms, bias=z, entropy=True)[:2],
                                     terms)  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.autograd.gradcheck(fn, (h, w, b))
    flat = {k: None if v is None else v.float() for k, v in vars(terms).items() if isinstance(v, torch.Tensor)}
    with use_backend("native"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # opcheck's random incoming gradients take the (warned) recompute path
        torch.library.opcheck(torch.ops.fastft.fused_linear_policy_logprobs.default,
                              (h.float(), w.float(), b.float(), labels, -100, True, flat["old_logprob"],
                               flat["advantage"], flat["token_weight"], flat["kl_weight"], flat["ref_logprob"],
                               flat["entropy_weight"], "clip", 0.2, 0.2, float("inf"), True, 1.0, 1.05, True, True,
                               True))


def test_bad_input():
    h, w, b, labels, terms = make(torch.float32)
    with pytest.raises(TypeError, match="terms must be a PolicyGradientTerms"):
        fused_linear_policy_logprobs(h, w, labels, {"advantage": terms.advantage})
    short = PolicyGradientTerms(advantage=terms.advantage[:, :-1], token_weight=terms.token_weight)
    with pytest.raises(ValueError, match="terms.advantage must be a tensor shaped like labels"):
        fused_linear_policy_logprobs(h, w, labels, short)
    with pytest.raises(ValueError, match="terms.delta must be None or a number > 0"):
        fused_linear_policy_logprobs(h, w, labels, PolicyGradientTerms(terms.advantage, terms.token_weight, delta=0))
    with pytest.raises(ValueError, match="loss_type must be one of"):
        fused_linear_policy_logprobs(h, w, labels, PolicyGradientTerms(terms.advantage, terms.token_weight,
                                                                       loss_type="ppo"))
    with pytest.raises(ValueError, match="terms.kl_weight and terms.ref_logprob go together"):
        fused_linear_policy_logprobs(h, w, labels, PolicyGradientTerms(terms.advantage, terms.token_weight,
                                                                       kl_weight=terms.kl_weight))
    bad = labels.clone()
    bad[0, 9] = 301
    with pytest.raises(ValueError, match="labels must be in"):
        fused_linear_policy_logprobs(h, w, bad, terms)
