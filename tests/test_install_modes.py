"""fastft without its C++ extension, and quantize_model without bitsandbytes (fresh interpreters)."""

import subprocess
import sys

import pytest

BLOCK_IMPORTS = "import sys; sys.modules['fastft._C'] = None; sys.modules['bitsandbytes'] = None\n"


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-W", "always::RuntimeWarning", "-c", BLOCK_IMPORTS + code],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_without_extension_runs_reference_path_and_warns_once():
    result = run_python(
        "import torch, fastft\n"
        "from fastft.ops import backend_for, describe\n"
        "w = torch.randn(16, 64)\n"
        "packed, state = fastft.nf4.quantize(w, 32, double_quant=True)\n"
        "x = torch.randn(3, 64, requires_grad=True)\n"
        "fastft.nf4.matmul(x, packed, state).sum().backward()\n"
        "fastft.nf4.dequantize(packed, state)\n"
        "print('backend', backend_for('cpu'))\n"
        "print('info', describe()['cpu'])\n"
        "print('grad', bool(x.grad.abs().sum() > 0))\n")
    assert result.returncode == 0, result.stderr
    assert "backend reference" in result.stdout
    assert "info reference (C++ extension not built" in result.stdout
    assert "grad True" in result.stdout
    assert result.stderr.count("C++ extension is not available") == 1


@pytest.mark.slow
def test_quantize_model_needs_no_bitsandbytes():
    result = run_python(
        "import torch, fastft\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,\n"
        "                     num_attention_heads=2, num_key_value_heads=1)\n"
        "model = fastft.quantize_model(LlamaForCausalLM(config))\n"
        "print(type(model.model.layers[0].mlp.down_proj).__name__)\n"
        "print(model(torch.randint(0, 64, (1, 5))).logits.shape)\n")
    assert result.returncode == 0, result.stderr
    assert "NF4Linear" in result.stdout and "torch.Size([1, 5, 64])" in result.stdout


SCALAR_CHECK = """
import torch, fastft
from fastft import _C
from fastft.ops import use_backend
from fastft.losses import fused_linear_distillation
from fastft.nn import BottleneckAdapter
from fastft.qat import fake_quantize
from fastft.ops import lora as lora_ops
from fastft.reference.lora import lora_dropout_ref
assert not _C.has_avx2()
for dtype in (torch.float32, torch.bfloat16):
    drop_x = torch.randn(301, 67).to(dtype)
    assert torch.equal(lora_ops.lora_dropout(drop_x, 0.3, 5), lora_dropout_ref(drop_x, 0.3, 5))
torch.manual_seed(0)
packed, state = fastft.nf4.quantize(torch.randn(96, 128), 64, double_quant=True)
x = torch.randn(3, 128)
sh, sw = torch.randn(9, 16), torch.randn(203, 16)
th, tw = torch.randn(9, 24), torch.randn(203, 24)
adapter = BottleneckAdapter(40, bottleneck_size=5, activation="gelu")
torch.nn.init.normal_(adapter.up.weight)
h = torch.randn(2, 7, 40, requires_grad=True)
results = {}
for name in ("native", "reference"):
    with use_backend(name):
        results[name] = (fastft.nf4.dequantize(packed, state), fastft.nf4.matmul(x, packed, state),
                         fastft.nf4.matmul(torch.randn(40, 128, generator=torch.Generator().manual_seed(1)),
                                           packed, state),
                         fused_linear_distillation(sh, sw, th, tw, beta=0.3, temperature=2.0, reduction="none"),
                         adapter(h), torch.autograd.grad(adapter(h).square().sum(), [h, adapter.down.weight])[0],
                         fake_quantize(h * 3, 4, 8), torch.autograd.grad(fake_quantize(h, 4, 8).sum(), [h])[0])
native, reference = results["native"], results["reference"]
assert torch.equal(native[0], reference[0])
assert torch.equal(native[-2], reference[-2]) and torch.equal(native[-1], reference[-1])  # fake quant: bit-exact
for a, b in zip(native[1:], reference[1:]):
    assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (a - b).abs().max()
print("scalar paths ok")
"""


@pytest.mark.slow
def test_scalar_cpu_paths_match_the_reference():
    import os

    result = subprocess.run([sys.executable, "-c", SCALAR_CHECK], capture_output=True, text=True, timeout=300,
                            env=dict(os.environ, FASTFT_NO_AVX2="1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "scalar paths ok" in result.stdout


VECTOR_PATH_CHECK = """
import torch
from fastft import _C, nf4
from fastft.ops import use_backend
from fastft.losses import fused_linear_distillation
from fastft.nn import BottleneckAdapter
from fastft.qat import fake_quantize
print("paths", int(_C.has_avx2()), int(_C.has_avx512()))
torch.manual_seed(0)


def both(fn):
    results = []
    for name in ("native", "reference"):
        with use_backend(name):
            out = fn()
            results.append(out if isinstance(out, tuple) else (out,))
    return zip(*results)


def close(a, b, tol, what):
    assert (a.double() - b.double()).norm() <= tol * b.double().norm(), what


for vocab in (16, 17, 203, 2000):  # whole and ragged 16- and 8-lane vectors
    sh, sw = torch.randn(9, 16, requires_grad=True), torch.randn(vocab, 16, requires_grad=True)
    th, tw = torch.randn(9, 24), torch.randn(vocab, 24)
    for beta in (0.0, 0.3, 1.0):
        def distill():
            loss = fused_linear_distillation(sh, sw, th, tw, beta=beta, temperature=2.0, reduction="none")
            return (loss, *torch.autograd.grad(loss.sum(), [sh, sw]))
        for a, b in both(distill):
            assert (a - b).abs().max() <= 1e-5 * b.abs().max(), (vocab, beta, (a - b).abs().max())
# 4-bit weights: K = 64 runs 16-lane direct kernels on AVX-512, K = 72 the 8-lane ones; 70 * 33 ragged ends
for shape, blocksize in (((40, 64), 64), ((40, 72), 32), ((70, 33), 32)):
    packed, state = nf4.quantize(torch.randn(*shape), blocksize, double_quant=True)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for a, b in both(lambda: nf4.dequantize(packed, state, dtype)):
            assert torch.equal(a, b), ("dequantize", shape, dtype)
        for rows in (1, 4, 5):
            x = torch.randn(rows, shape[1], dtype=dtype, requires_grad=True)
            for a, b in both(lambda: (y := nf4.matmul(x, packed, state), *torch.autograd.grad(y.sum(), x))):
                close(a, b, 1e-5 if dtype == torch.float32 else 1e-2, ("matmul", shape, dtype, rows))
for dtype in (torch.float32, torch.bfloat16):
    for n in (16 * 37, 8 * 37 + 5):
        x = torch.randn(3, n, dtype=dtype)
        for a, b in both(lambda: torch.ops.fastft.lora_dropout(x, 0.3, 7)):
            assert torch.equal(a, b), ("lora dropout", dtype, n)
x, dy = torch.randn(48, 96), torch.randn(48, 96)
x[3, 5] = float("nan")
x[7, 40] = float("inf")
for group in (16, 24, 32):
    for symmetric in (True, False):
        def qat():
            xg = x.clone().requires_grad_()
            y = fake_quantize(xg, 4, group, symmetric)
            return (y, *torch.autograd.grad(y, xg, dy))
        for a, b in both(qat):
            assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num()), ("qat", group)
for rank in (8, 24):  # one ragged and two whole 16-column panels
    adapter = BottleneckAdapter(80, bottleneck_size=rank, activation="gelu", init="default")
    h, dy = torch.randn(1030, 80, requires_grad=True), torch.randn(1030, 80)
    params = [h, *adapter.parameters()]
    for a, b in both(lambda: (adapter(h), *torch.autograd.grad(adapter(h), params, dy))):
        close(a, b, 1e-5, ("bottleneck", rank))
print("vector paths ok")
"""


def _cpu_flags() -> set:
    return set(open("/proc/cpuinfo").read().split())


@pytest.mark.parametrize("env", ({}, {"FASTFT_NO_AVX512": "1"}))
def test_the_cpu_chooses_the_vector_path_and_each_matches_the_reference(env):
    """The C++ kernels run on AVX-512 where the CPU has it and FASTFT_NO_AVX512 is unset, else on AVX2 (else
    scalar); each path gives the reference's results: bit-exact where the op is (4-bit dequantization, LoRA dropout,
    fake quantization), within fp32 rounding where only the summation order differs (an AVX2-only CPU runs the AVX2
    paths under both settings)."""
    import os

    result = subprocess.run([sys.executable, "-c", VECTOR_PATH_CHECK], capture_output=True, text=True, timeout=300,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    flags = _cpu_flags()
    avx2 = {"avx2", "fma", "f16c"} <= flags
    avx512 = avx2 and {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= flags and not env
    assert f"paths {int(avx2)} {int(avx512)}" in result.stdout
    assert "vector paths ok" in result.stdout


def test_info_lists_every_op(capsys):
    from fastft.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "cpu: native (C++ extension built" in out
    for name in ("nf4_linear", "lora_down", "lora_dropout", "fused_linear_distillation", "bottleneck_adapter",
                 "fake_quantize", "fake_quantize_with_scale", "fake_quant_linear"):
        assert f"fastft::{name}," in out or out.rstrip().endswith(f"fastft::{name}")
