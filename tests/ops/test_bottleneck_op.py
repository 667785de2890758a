"""fastft::bottleneck_adapter and the native residual GEMM vs the plain-torch reference, forward and backward."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import TOLERANCE, rel_error
from fastft.bench.harness import saved_for_backward_bytes
from fastft.ops import bottleneck as ops
from fastft.ops.backends import reference as reference_backend
from fastft.ops import use_backend
from fastft.ops.backend import native_extension
from fastft.reference.bottleneck import ACTIVATIONS, bottleneck_adapter_ref


KERNEL_ROWS = 521  # x 2 in a batch: enough tokens (1024) for fastft._C's kernels rather than its ATen path


def make_inputs(rows, hidden, r, x_dtype=torch.float32, w_dtype=torch.float32, bias=True, layer_norm=False,
                residual=False, batch=(2,)):
    g = torch.Generator().manual_seed(rows * 1000 + hidden + r)

    def rand(*shape, dtype, std=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * std).to(dtype).requires_grad_()

    x = rand(*batch, rows, hidden, dtype=x_dtype)
    args = dict(w_down=rand(r, hidden, dtype=w_dtype, std=0.2), b_down=rand(r, dtype=w_dtype) if bias else None,
                w_up=rand(hidden, r, dtype=w_dtype, std=0.2), b_up=rand(hidden, dtype=w_dtype) if bias else None,
                residual=rand(*batch, rows, hidden, dtype=x_dtype) if residual else None,
                ln_weight=rand(hidden, dtype=w_dtype) if layer_norm else None,
                ln_bias=rand(hidden, dtype=w_dtype) if layer_norm else None)
    return x, args


def op(x, activation, scale, layer_norm, **a):
    return ops.bottleneck_adapter(x, a["w_down"], a["b_down"], a["w_up"], a["b_up"], activation, scale,
                                  a["residual"], a["ln_weight"], a["ln_bias"], layer_norm, 1e-5)[0]


def in_fp64(x, args):
    x64 = x.detach().double().requires_grad_()
    a64 = {k: (v.detach().double().requires_grad_() if v is not None else None) for k, v in args.items()}
    return x64, a64


def grads(out, grad, x, args):
    leaves = [x] + [v for v in args.values() if v is not None]
    return torch.autograd.grad(out, leaves, grad)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layer_norm", (False, True))
@pytest.mark.parametrize("residual", (False, True))
@pytest.mark.parametrize("bias", (False, True))
def test_matches_reference_fp32(backend, activation, layer_norm, residual, bias):
    x, args = make_inputs(KERNEL_ROWS, 50, 7, bias=bias, layer_norm=layer_norm, residual=residual)
    out = op(x, activation, 0.7, layer_norm, **args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    ours = grads(out, grad, x, args)
    x64, a64 = in_fp64(x, args)
    expected = bottleneck_adapter_ref(x64, activation=activation, scale=0.7, layer_norm=layer_norm, **a64)
    theirs = grads(expected, grad.double(), x64, a64)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_error(out, expected) < 1e-5
    for g_ours, g_theirs in zip(ours, theirs):
        assert g_ours.dtype == torch.float32
        assert rel_error(g_ours, g_theirs) < 1e-5


@pytest.mark.parametrize("trainable", ("input", "weights", "up"))
@pytest.mark.parametrize("layer_norm", (False, True))
def test_partial_gradients_match_reference(backend, trainable, layer_norm):
    """A frozen adapter (gradient to its input only), a first adapter whose input needs no gradient, and one
    projection frozen: the gradients asked for match the reference's."""
    x, args = make_inputs(KERNEL_ROWS, 40, 6, layer_norm=layer_norm)
    x.requires_grad_(trainable != "weights")
    for name, value in args.items():
        if value is not None:
            value.requires_grad_(trainable == "weights" or (trainable == "up" and name in ("w_up", "b_up")))
    out = op(x, "gelu", 0.7, layer_norm, **args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    leaves = [t for t in [x, *args.values()] if t is not None and t.requires_grad]
    ours = torch.autograd.grad(out, leaves, grad)
    x64, a64 = in_fp64(x, args)
    expected = bottleneck_adapter_ref(x64, activation="gelu", scale=0.7, layer_norm=layer_norm, **a64)
    leaves64 = [t64 for t, t64 in zip([x, *args.values()], [x64, *a64.values()]) if t is not None and t.requires_grad]
    for g_ours, g_theirs in zip(ours, torch.autograd.grad(expected, leaves64, grad.double())):
        assert rel_error(g_ours, g_theirs) < 1e-5


@pytest.mark.parametrize("x_dtype", (torch.float16, torch.bfloat16))
@pytest.mark.parametrize("w_dtype", ("same", torch.float32))
@pytest.mark.parametrize("layer_norm", (False, True))
def test_half_precision_matches_reference(backend, x_dtype, w_dtype, layer_norm):
    w_dtype = x_dtype if w_dtype == "same" else w_dtype
    x, args = make_inputs(29, 72, 8, x_dtype, w_dtype, layer_norm=layer_norm)
    out = op(x, "gelu", 2.0, layer_norm, **args)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(x_dtype)
    ours = grads(out, grad, x, args)
    x64, a64 = in_fp64(x, args)
    expected = bottleneck_adapter_ref(x64, activation="gelu", scale=2.0, layer_norm=layer_norm, **a64)
    theirs = grads(expected, grad.double(), x64, a64)
    assert out.dtype == x_dtype
    assert rel_error(out, expected) < TOLERANCE[x_dtype]
    for g_ours, g_theirs, leaf in zip(ours, theirs, [x] + [v for v in args.values() if v is not None]):
        assert g_ours.dtype == leaf.dtype
        assert rel_error(g_ours, g_theirs) < 2 * TOLERANCE[g_ours.dtype] if g_ours.dtype != torch.float32 else 2e-2


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("layer_norm", (False, True))
@pytest.mark.parametrize("residual", (False, True))
def test_gradcheck(backend, activation, layer_norm, residual):
    x, args = make_inputs(3, 10, 4, torch.float64, torch.float64, layer_norm=layer_norm, residual=residual)
    if activation == "relu":  # keep pre-activations away from relu's kink
        with torch.no_grad():
            args["b_down"].copy_(torch.tensor([3.0, -3.0, 2.5, -2.5], dtype=torch.float64))
    names = [k for k, v in args.items() if v is not None]

    def fn(x, *tensors):
        a = dict(args, **dict(zip(names, tensors)))
        return op(x, activation, 0.5, layer_norm, **a)

    assert torch.autograd.gradcheck(fn, (x, *[args[k] for k in names]))


def test_non_contiguous_inputs(backend):
    x, args = make_inputs(KERNEL_ROWS, 40, 6)
    x_t = x.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same values, other strides
    out = op(x_t, "silu", 1.0, False, **args)
    expected = op(x.detach(), "silu", 1.0, False, **{k: v.detach() if v is not None else None for k, v in args.items()})
    assert not x_t.is_contiguous()
    assert rel_error(out, expected) < 1e-6


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), hidden=st.integers(1, 70), r=st.integers(1, 20), batch=st.integers(1, 3))
def test_ragged_shapes(rows, hidden, r, batch):
    x, args = make_inputs(rows, hidden, r, batch=(batch,))
    out = op(x, "gelu_tanh", 0.3, False, **args)
    x64, a64 = in_fp64(x, args)
    expected = bottleneck_adapter_ref(x64, activation="gelu_tanh", scale=0.3, **a64)
    assert rel_error(out, expected) < 1e-5


@pytest.mark.skipif(native_extension() is None, reason="needs the C++ extension")
@pytest.mark.parametrize("shape", ((1, 1, 1), (0, 8, 3), (60, 40, 65), (1024, 1, 1), (1031, 64, 16), (1025, 13, 17),
                                   (1100, 1000, 64), (1081, 1024, 20), (1200, 33, 5), (1040, 40, 65)))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_native_kernels_match_reference(shape, activation):
    """fastft._C's forward and backward on ragged shapes (blocks of 48 rows, 6-row tiles, 16-column panels, one
    chunk of blocks per thread; fewer than 1024 tokens or r > 64 take ATen's GEMMs), against the plain-torch
    formulas in fp64, with each gradient asked for or not."""
    tokens, hidden, r = shape
    g = torch.Generator().manual_seed(0)
    v, residual, dy = (torch.randn(tokens, hidden, generator=g) for _ in range(3))
    w_down, w_up = torch.randn(r, hidden, generator=g) / 4, torch.randn(hidden, r, generator=g) / 4
    b_down, b_up = torch.randn(r, generator=g), torch.randn(hidden, generator=g)
    out, z = native_extension().bottleneck_adapter(v, residual, w_down, b_down, w_up, b_up, activation, 0.7)
    z64 = v.double() @ w_down.double().t() + b_down.double()
    expected = bottleneck_adapter_ref(v.double(), w_down.double(), b_down.double(), w_up.double(), b_up.double(),
                                      activation, 0.7, residual.double())
    assert rel_error(z, z64) < 1e-5 and rel_error(out, expected) < 1e-5
    for add_dy, need_dv, need_weights in ((False, True, True), (True, True, True), (True, True, False),
                                          (False, False, True)):
        grads = native_extension().bottleneck_backward(dy, v, z, w_down, w_up, activation, 0.7, add_dy, need_dv,
                                                       need_weights)
        expected = reference_backend.bottleneck_backward(dy.double(), v.double(), z.double(), w_down.double(),
                                                         w_up.double(), activation, 0.7, add_dy, need_dv, need_weights)
        for ours, theirs in zip(grads, expected):
            assert ours.dtype == torch.float32 and ours.shape == theirs.shape
            assert rel_error(ours, theirs) < 1e-5
    with pytest.raises(RuntimeError, match="do not chain"):
        native_extension().bottleneck_adapter(v, residual, w_down, b_down, w_up[:, :-1] if r > 1 else w_up[:0],
                                              b_up, activation, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        native_extension().bottleneck_backward(dy.double(), v, z, w_down, w_up, activation, 1.0, True, True, True)


@pytest.mark.skipif(native_extension() is None, reason="needs the C++ extension")
@pytest.mark.parametrize("threads", (1, 3, 4))
def test_native_backward_with_other_thread_counts(threads):
    """The backward's per-thread gradient parts (36 blocks of rows over 1, 3 or 4 threads) add up to the reference."""
    g = torch.Generator().manual_seed(1)
    dy, v = torch.randn(1700, 40, generator=g), torch.randn(1700, 40, generator=g)
    z, w_down, w_up = (torch.randn(1700, 5, generator=g), torch.randn(5, 40, generator=g),
                       torch.randn(40, 5, generator=g))
    expected = reference_backend.bottleneck_backward(dy.double(), v.double(), z.double(), w_down.double(),
                                                     w_up.double(), "silu", 0.5, True, True, True)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        grads = native_extension().bottleneck_backward(dy, v, z, w_down, w_up, "silu", 0.5, True, True, True)
    finally:
        torch.set_num_threads(before)
    for ours, theirs in zip(grads, expected):
        assert rel_error(ours, theirs) < 1e-5


def test_saves_half_of_plain_torch_bottleneck_bytes():
    x, args = make_inputs(64, 128, 16, batch=())
    exclude = [x] + [v for v in args.values() if v is not None]
    fused = saved_for_backward_bytes(lambda: op(x, "gelu", 1.0, False, **args), exclude=exclude)
    plain = saved_for_backward_bytes(lambda: bottleneck_adapter_ref(x, activation="gelu", **args), exclude=exclude)
    assert fused == 64 * 16 * 4  # z only
    assert plain == 2 * fused  # z and gelu(z)
    norm = dict(args, ln_weight=torch.ones(128), ln_bias=torch.zeros(128))
    exclude += [norm["ln_weight"], norm["ln_bias"]]
    with_norm = saved_for_backward_bytes(lambda: op(x, "gelu", 1.0, True, **norm), exclude=exclude)
    assert with_norm == 64 * 16 * 4 + 2 * 64 * 4  # z, mean, rstd; the normalized x is recomputed
    plain_norm = saved_for_backward_bytes(
        lambda: bottleneck_adapter_ref(x, activation="gelu", layer_norm=True, **norm), exclude=exclude)
    assert plain_norm >= with_norm + 64 * 128 * 4  # plain torch also keeps the normalized x


def test_opcheck():
    x, args = make_inputs(6, 12, 3)
    a = args
    torch.library.opcheck(torch.ops.fastft.bottleneck_adapter.default,
                          (x, a["w_down"], a["b_down"], a["w_up"], a["b_up"], "gelu", 0.5, None, None, None, False,
                           1e-5))
    x, a = make_inputs(6, 12, 3, layer_norm=True, residual=True)
    torch.library.opcheck(torch.ops.fastft.bottleneck_adapter.default,
                          (x, a["w_down"], a["b_down"], a["w_up"], a["b_up"], "relu", 0.5, a["residual"],
                           a["ln_weight"], a["ln_bias"], True, 1e-5))
    for add_dy, need_dv, need_weights in ((False, True, True), (True, True, False), (False, False, True)):
        torch.library.opcheck(torch.ops.fastft.bottleneck_backward.default,
                              (torch.randn(6, 12), torch.randn(6, 12), torch.randn(6, 3), torch.randn(3, 12),
                               torch.randn(12, 3), "silu", 0.5, add_dy, need_dv, need_weights))


def test_bad_activation_is_named():
    x, args = make_inputs(4, 8, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        op(x, "tanh", 1.0, False, **args)


def test_bad_dtypes_and_devices_are_named():
    """The op checks its inputs' metadata in its implementation and in its fake (meta) implementation alike:
    an integer input is not silently cast and returned, a meta input with CPU weights is not answered by the fake."""
    x, args = make_inputs(4, 8, 2, residual=True, layer_norm=True)
    with pytest.raises(TypeError, match="x must be a floating tensor, got torch.int64"):
        op(x.detach().long(), "relu", 1.0, True, **args)
    with pytest.raises(TypeError, match="residual must be None or a floating tensor, got torch.int32"):
        op(x, "relu", 1.0, True, **dict(args, residual=args["residual"].detach().int()))
    with pytest.raises(TypeError, match="w_up must be a floating tensor"):
        op(x, "relu", 1.0, True, **dict(args, w_up=args["w_up"].detach().long()))
    with pytest.raises(TypeError, match="parameters must share one dtype.*w_up torch.float64"):
        op(x, "relu", 1.0, True, **dict(args, w_up=args["w_up"].detach().double()))
    with pytest.raises(ValueError, match="residual is on cpu but x is on meta"):
        op(x.detach().to("meta"), "relu", 1.0, True, **args)
    with pytest.raises(ValueError, match="x is on meta but the adapter's parameter w_down is on cpu"):
        op(x.detach().to("meta"), "relu", 1.0, True, **dict(args, residual=None))
    with pytest.raises(ValueError, match="residual is on meta but x is on cpu"):
        op(x, "relu", 1.0, True, **dict(args, residual=args["residual"].detach().to("meta")))
    with pytest.raises(ValueError, match="x is on cpu but the adapter's parameter ln_bias is on meta"):
        op(x, "relu", 1.0, True, **dict(args, ln_bias=args["ln_bias"].detach().to("meta")))
    meta = {k: v.detach().to("meta") for k, v in args.items()}  # all on meta: shapes only, as before
    out = op(x.detach().to("meta"), "relu", 1.0, True, **meta)
    assert out.device.type == "meta" and out.shape == x.shape


def test_reference_backend_runs_without_extension_kernels():
    x, args = make_inputs(5, 9, 3)
    with use_backend("reference"):
        out = op(x, "relu", 1.0, False, **args)
    x64, a64 = in_fp64(x, args)
    assert rel_error(out, bottleneck_adapter_ref(x64, activation="relu", **a64)) < 1e-6
