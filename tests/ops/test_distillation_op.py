"""fastft.losses.fused_linear_distillation vs the reference formulas on materialized logits."""

import itertools
import os
import subprocess
import sys

import pytest
import torch

from conftest import rel_error
from fastft.losses import fused_linear_distillation
from fastft.nn import FusedLinearDistillationLoss
from fastft.ops import distillation as ops
from fastft.reference.distillation import distillation_ref, generalized_jsd_ref

GRID = list(itertools.product((0.0, 0.1, 0.5, 0.9, 1.0), (1.0, 2.0, 4.0), (0.0, 0.5, 1.0)))


def inputs(dtype=torch.float64, tokens=(2, 7), student=24, teacher=40, vocab=301, bias=True, seed=0):
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(dtype)

    sh = randn(*tokens, student).requires_grad_()
    sw = randn(vocab, student).requires_grad_()
    sb = randn(vocab).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, tokens, generator=generator)
    labels.view(-1)[:3] = -100
    return sh, sw, randn(*tokens, teacher), randn(vocab, teacher), labels, sb, randn(vocab) if bias else None


def both(args, **options):
    sh, sw, th, tw, labels, sb, tb = args
    ours = fused_linear_distillation(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, **options)
    theirs = distillation_ref(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, dtype=torch.float64,
                              **options)
    grad = torch.randn_like(theirs)
    params = [t for t in (sh, sw, sb) if t is not None]
    return ours, theirs, torch.autograd.grad(ours, params, grad.to(ours.dtype)), torch.autograd.grad(theirs, params, grad)


@pytest.mark.parametrize("beta,temperature,alpha", GRID)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
def test_matches_reference_fp64(beta, temperature, alpha, reduction):
    ours, theirs, ours_grads, their_grads = both(inputs(), beta=beta, temperature=temperature, alpha=alpha,
                                                 reduction=reduction, scale_by_t2=temperature == 2.0)
    assert ours.shape == theirs.shape
    assert rel_error(ours, theirs) < 1e-10
    for a, b in zip(ours_grads, their_grads):
        assert rel_error(a, b) < 1e-10


@pytest.mark.parametrize("dtype,tolerance", ((torch.float32, 1e-5), (torch.bfloat16, 1e-2), (torch.float16, 1e-2)))
def test_lower_precision_inputs(dtype, tolerance):
    args = inputs(dtype, vocab=32003 // 16)
    ours, theirs, ours_grads, their_grads = both(args, beta=0.5, temperature=2.0, alpha=0.5)
    assert ours.dtype == torch.float32  # the loss is fp32 whatever the inputs
    assert rel_error(ours, theirs) < tolerance
    for a, b in zip(ours_grads, their_grads):
        assert a.dtype == dtype and rel_error(a, b) < tolerance


@pytest.mark.parametrize("beta", (0.0, 0.3, 1.0))
@pytest.mark.parametrize("temperature", (1.0, 3.0))
def test_native_row_kernel_matches_the_torch_path(beta, temperature):
    from fastft.ops import use_backend

    results = {}
    for name in ("native", "reference"):
        sh, sw, th, tw, labels, sb, tb = inputs(torch.float32, tokens=(37,), vocab=1003)
        with use_backend(name):
            loss = fused_linear_distillation(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, beta=beta,
                                             temperature=temperature, alpha=0.5, reduction="none")
            loss.backward(torch.linspace(0.5, 1.5, 37))
        results[name] = (loss, sh.grad, sw.grad, sb.grad)
    for ours, theirs in zip(results["native"], results["reference"]):
        assert rel_error(ours, theirs) < 1e-5


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
def test_minus_infinity_student_logits_as_the_reference(beta):
    """A student logit of -inf (a vocabulary entry masked in the head): its probability is exactly 0 on every CPU
    path (the vector exp flushes underflow to 0), so the loss is what the reference's torch formulas give: +inf for
    KL(teacher || student) (beta 0), NaN where the student's terms hold 0 * log 0 (the mixture, the reverse KL);
    the vocabulary long enough for whole and partial vector tiles."""
    from fastft.ops import use_backend

    sh, sw, th, tw, labels, _, _ = inputs(torch.float32, tokens=(5,), vocab=37)
    sw = sw.detach().clone()
    sw[3], sw[20] = -float("inf"), -float("inf")  # with positive hidden values: -inf logits in rows whose h > 0
    sh = sh.detach().abs() + 0.1
    results = {}
    for name in ("native", "reference"):
        with use_backend(name):
            results[name] = fused_linear_distillation(sh, sw, th, tw, labels, beta=beta, temperature=2.0, alpha=1.0,
                                                      reduction="none")
    ours, theirs = results["native"], results["reference"]
    assert torch.equal(ours.isnan(), theirs.isnan()) and torch.equal(ours.isinf(), theirs.isinf())
    finite = theirs.isfinite()
    assert rel_error(ours[finite], theirs[finite]) < 1e-5


def test_beta_endpoints_are_exact_kl_directions():
    s, t = torch.randn(5, 11, dtype=torch.float64), torch.randn(5, 11, dtype=torch.float64)
    p, q = t.softmax(-1), s.softmax(-1)
    assert torch.allclose(generalized_jsd_ref(s, t, 0.0), (p * (p.log() - q.log())).sum(-1))
    assert torch.allclose(generalized_jsd_ref(s, t, 1.0), (q * (q.log() - p.log())).sum(-1))


def test_many_chunks_vocab_not_a_tile_multiple_and_no_labels(monkeypatch):
    monkeypatch.setattr(ops, "_TILE_BYTES", 4 * 3 * 32003)  # 3 tokens per chunk
    monkeypatch.setattr(ops, "_VOCAB_TILE", 1000)
    args = list(inputs(torch.float32, tokens=(10,), vocab=32003, bias=False))
    args[4] = None
    ours, theirs, ours_grads, their_grads = both(args, beta=0.9, temperature=4.0)
    assert rel_error(ours, theirs) < 1e-5
    for a, b in zip(ours_grads, their_grads):
        assert rel_error(a, b) < 1e-5


def test_num_items_in_batch_and_frozen_head():
    sh, sw, th, tw, labels, sb, tb = inputs()
    sw.requires_grad_(False)
    loss = fused_linear_distillation(sh, sw, th, tw, labels, beta=0.5, num_items_in_batch=40)
    total = fused_linear_distillation(sh, sw, th, tw, labels, beta=0.5, reduction="sum")
    assert torch.allclose(loss, total / 40)
    loss.backward()
    assert sh.grad is not None and sw.grad is None


def test_gradcheck_and_opcheck():
    sh, sw, th, tw, labels, sb, tb = inputs(tokens=(5,), student=6, teacher=7, vocab=13)
    for reduction in ("mean", "none"):
        fn = lambda a, b, c: fused_linear_distillation(  # noqa: E731
            a, b, th, tw, labels, student_bias=c, beta=0.3, temperature=2.0, alpha=0.7, reduction=reduction)
        assert torch.autograd.gradcheck(fn, (sh, sw, sb))
    denominator = torch.tensor(4.0, dtype=torch.float64)
    torch.library.opcheck(torch.ops.fastft.fused_linear_distillation.default,
                          (sh, sw, th, tw, labels, sb, tb, 0.5, 2.0, 0.5, True, -100, 0, denominator, False, True, True,
                           True))


@pytest.mark.parametrize("beta", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("reduction", ("mean", "none"))
def test_teacher_topk_matches_its_reference(beta, reduction):
    ours, theirs, ours_grads, their_grads = both(inputs(), beta=beta, temperature=2.0, alpha=0.5,
                                                 reduction=reduction, teacher_topk=20)
    assert rel_error(ours, theirs) < 1e-10
    for a, b in zip(ours_grads, their_grads):
        assert rel_error(a, b) < 1e-10
    # with k = vocab - 1 the rest bucket holds one token: the exact loss
    sh, sw, th, tw, labels, sb, tb = inputs()
    full = fused_linear_distillation(sh, sw, th, tw, labels, beta=beta)
    assert torch.allclose(fused_linear_distillation(sh, sw, th, tw, labels, beta=beta, teacher_topk=300), full)
    with pytest.raises(ValueError, match="teacher_topk must be in 1..300"):
        fused_linear_distillation(sh, sw, th, tw, labels, teacher_topk=301)


def test_backward_twice_and_scaled_incoming_gradient():
    sh, sw, th, tw, labels, sb, tb = inputs()
    loss = fused_linear_distillation(sh, sw, th, tw, labels, beta=0.5)
    loss.backward(retain_graph=True)
    once = sh.grad.clone()
    (loss * 3).backward()
    assert torch.allclose(sh.grad, 4 * once)


def test_module_wrapper():
    sh, sw, th, tw, labels, sb, tb = inputs()
    module = FusedLinearDistillationLoss(beta=0.1, temperature=2.0, alpha=0.5, scale_by_t2=True)
    expected = fused_linear_distillation(sh, sw, th, tw, labels, beta=0.1, temperature=2.0, alpha=0.5,
                                         scale_by_t2=True)
    assert torch.equal(module(sh, sw, th, tw, labels), expected)


def test_bad_inputs():
    sh, sw, th, tw, labels, sb, tb = inputs()
    with pytest.raises(ValueError, match="vocabularies differ"):
        fused_linear_distillation(sh, sw, th, tw[:-1], labels)
    with pytest.raises(ValueError, match="student_hidden's last dim"):
        fused_linear_distillation(sh[..., :-1], sw, th, tw, labels)
    with pytest.raises(ValueError, match="beta must be in"):
        fused_linear_distillation(sh, sw, th, tw, labels, beta=1.5)
    with pytest.raises(ValueError, match="needs labels"):
        fused_linear_distillation(sh, sw, th, tw, None, alpha=0.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        fused_linear_distillation(sh, sw, th, tw, labels, reduction="batchmean")
    with pytest.raises(ValueError, match="labels must be integer"):
        fused_linear_distillation(sh, sw, th, tw, labels.float())


PEAK_SCRIPT = """
import sys, torch
from fastft.bench.harness import peak_rss_above_now_mib
from fastft.losses import fused_linear_distillation
tokens, fused = int(sys.argv[1]), sys.argv[2] == "fused"
torch.manual_seed(0)
sh = torch.randn(tokens, 32, requires_grad=True); sw = torch.randn(8000, 32, requires_grad=True)
th = torch.randn(tokens, 32); tw = torch.randn(8000, 32); labels = torch.randint(0, 8000, (tokens,))
from fastft.reference.distillation import distillation_ref
loss_fn = fused_linear_distillation if fused else distillation_ref
print(peak_rss_above_now_mib(lambda: loss_fn(sh, sw, th, tw, labels).backward()))
"""


@pytest.mark.slow
def test_peak_memory_stays_flat_in_tokens():
    def peak_mib(tokens, mode):
        # Allocations of 1 MiB and more are mmapped and unmapped on free, so the peak RSS tracks live tensors.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(1 << 20))
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tokens), mode], capture_output=True, text=True,
                             timeout=300, check=True, env=env).stdout
        return float(out.strip().splitlines()[-1])

    # 2048 tokens already fill one chunk's tiles (~1570 tokens at V = 8000): from there on nothing grows
    small, large = peak_mib(2048, "fused"), peak_mib(8192, "fused")
    plain = peak_mib(8192, "plain")
    # The head's fp32 gradient accumulator and one chunk's tiles; no tokens x vocab tensor.
    assert large < small + 32, (small, large)
    assert large < 0.15 * plain, (large, plain)


@pytest.mark.parametrize("beta", (0.0, 0.1, 0.5, 0.9, 1.0))
@pytest.mark.parametrize("temperature", (1.0, 2.0, 4.0))
def test_matches_trl_generalized_jsd_loss(beta, temperature, monkeypatch):
    """TRL's own GKDTrainer.generalized_jsd_loss on materialized logits is the oracle for the soft term (alpha=1):
    its "batchmean" with labels is our "mean" over valid tokens, and num_items_in_batch divides the same sum."""
    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    sh, sw, th, tw, labels, sb, tb = inputs()
    student_logits = (sh @ sw.t() + sb).detach().requires_grad_()
    teacher_logits = th @ tw.t() + tb
    trl_loss = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature)
    ours = fused_linear_distillation(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, beta=beta,
                                     temperature=temperature)
    assert rel_error(ours, trl_loss) < 1e-10
    (trl_grad,) = torch.autograd.grad(trl_loss, [student_logits])
    (ours_grad,) = torch.autograd.grad(ours, [sh])
    assert rel_error(ours_grad, trl_grad @ sw.detach()) < 1e-10  # d/dh = d/dlogits @ W
    trl_sum = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, labels, beta, temperature,
                                              num_items_in_batch=40)
    ours_sum = fused_linear_distillation(sh, sw, th, tw, labels, student_bias=sb, teacher_bias=tb, beta=beta,
                                         temperature=temperature, num_items_in_batch=40)
    assert rel_error(ours_sum, trl_sum) < 1e-10


@pytest.mark.parametrize("temperature", (float("nan"), float("inf"), -float("inf"), 0.0, -1.0, 1e-30, 1e-3, 1e3))
def test_temperature_outside_its_range_is_named(temperature):
    sh, sw, th, tw, labels, sb, tb = inputs()
    with pytest.raises(ValueError, match=r"temperature must be finite and in \[0.01, 100\]"):
        fused_linear_distillation(sh, sw, th, tw, labels, temperature=temperature)
    with pytest.raises(ValueError, match="temperature"):
        FusedLinearDistillationLoss(temperature=temperature)


@pytest.mark.parametrize("temperature", (0.01, 100.0))
def test_temperature_at_the_bounds_matches_reference(temperature):
    ours, theirs, ours_grads, their_grads = both(inputs(), beta=0.5, temperature=temperature, alpha=0.5,
                                                 scale_by_t2=True)
    assert rel_error(ours, theirs) < 1e-10
    for a, b in zip(ours_grads, their_grads):
        assert rel_error(a, b) < 1e-10


def test_option_types_and_ranges_are_named():
    sh, sw, th, tw, labels, sb, tb = inputs()
    cases = [(TypeError, "teacher_topk must be None or an int", dict(teacher_topk=True)),
             (TypeError, "teacher_topk must be None or an int", dict(teacher_topk=5.0)),
             (ValueError, "teacher_topk must be None or an int >= 1", dict(teacher_topk=0)),
             (ValueError, r"beta must be in \[0, 1\]", dict(beta=-0.1)),
             (ValueError, r"beta must be in \[0, 1\]", dict(beta=float("nan"))),
             (ValueError, r"alpha must be in \[0, 1\]", dict(alpha=1.5)),
             (ValueError, r"alpha must be in \[0, 1\]", dict(alpha=-0.5)),
             (ValueError, r"alpha must be in \[0, 1\]", dict(alpha=float("nan"))),
             (TypeError, "temperature must be a real number", dict(temperature="2")),
             (TypeError, "scale_by_t2 must be a bool", dict(scale_by_t2="no")),
             (TypeError, "ignore_index must be an int", dict(ignore_index=-100.0))]
    for error, message, options in cases:
        with pytest.raises(error, match=message):
            fused_linear_distillation(sh, sw, th, tw, labels, **options)
        with pytest.raises(error, match=message):
            FusedLinearDistillationLoss(**options)


@pytest.mark.parametrize("num_items", (0, -3, 0.0, float("nan"), float("inf"), torch.tensor(0), torch.tensor(-2.0),
                                       torch.tensor(float("nan"))))
def test_num_items_in_batch_must_be_positive(num_items):
    sh, sw, th, tw, labels, sb, tb = inputs()
    with pytest.raises(ValueError, match=r"num_items_in_batch must be a finite number > 0"):
        fused_linear_distillation(sh, sw, th, tw, labels, beta=0.5, num_items_in_batch=num_items)


def test_num_items_in_batch_types():
    sh, sw, th, tw, labels, sb, tb = inputs()
    for num_items in (True, "40", torch.tensor([40, 2]), torch.tensor(True)):
        with pytest.raises(TypeError, match="num_items_in_batch must be"):
            fused_linear_distillation(sh, sw, th, tw, labels, num_items_in_batch=num_items)
    total = fused_linear_distillation(sh, sw, th, tw, labels, beta=0.5, reduction="sum")
    for num_items in (40, 40.0, torch.tensor(40), torch.tensor([40.0])):  # a one-element tensor, as Trainer passes
        loss = fused_linear_distillation(sh, sw, th, tw, labels, beta=0.5, num_items_in_batch=num_items)
        assert torch.allclose(loss, total / 40)


@pytest.mark.parametrize("alpha", (1.0, 0.5))
@pytest.mark.parametrize("reduction", ("mean", "none"))
@pytest.mark.parametrize("bad", (301, 1000, -1, -101))
def test_labels_outside_the_vocabulary_are_named(alpha, reduction, bad):
    """Also with alpha = 1, where labels only pick the tokens that count: a label the head cannot predict is an
    error, not a silently counted token."""
    sh, sw, th, tw, labels, sb, tb = inputs()
    labels = labels.clone()
    labels[1, 4] = bad
    with pytest.raises(ValueError,
                       match=rf"labels must be in \[0, 301\).*ignore_index=-100, got {bad} at flat index 11"):
        fused_linear_distillation(sh, sw, th, tw, labels, alpha=alpha, reduction=reduction)
    # another ignore_index: -100 is then a label like any other
    labels[1, 4] = 0
    with pytest.raises(ValueError, match=r"labels must be in \[0, 301\).*ignore_index=-1, got -100"):
        fused_linear_distillation(sh, sw, th, tw, labels, alpha=alpha, reduction=reduction, ignore_index=-1)
    ok = fused_linear_distillation(sh, sw, th, tw, labels.masked_fill(labels == -100, -1), alpha=alpha,
                                   reduction=reduction, ignore_index=-1)
    assert torch.equal(ok, fused_linear_distillation(sh, sw, th, tw, labels, alpha=alpha, reduction=reduction))


def test_distillation_trainer_checks_its_options_first():
    from fastft.integrations.distillation import DistillationTrainer

    with pytest.raises(ValueError, match="temperature must be finite"):
        DistillationTrainer(teacher=torch.nn.Linear(2, 2), temperature=0.0)
    with pytest.raises(ValueError, match=r"alpha must be in \[0, 1\]"):
        DistillationTrainer(teacher=torch.nn.Linear(2, 2), alpha=2.0)
