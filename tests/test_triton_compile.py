"""The Triton kernels of kernels/ (nf4, lora, bottleneck, distillation, qat) compile for an H100 (sm_90) down to
a cubin, without a GPU.

The interpreter tests check the arithmetic; this checks what only the real compiler sees (tl.dot operand
shapes and dtypes, layouts, constexpr branches)."""

import pytest
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastft.kernels import nf4 as kernels

POINTERS = {"packed_ptr": "*u8", "code_ptr": "*fp32", "nested_absmax_ptr": "*fp32", "nested_code_ptr": "*fp32"}
SCALARS = {"nested_offset": "fp32", "M": "i32", "N": "i32", "K": "i32", "numel": "i64", "blocksize": "i32",
           "nested_blocksize": "i32"}


def compile_for_h100(kernel, dtype: str, constexprs: dict, nested: bool):
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name == "absmax_ptr":
            signature[name] = "*u8" if nested else "*fp32"
        elif name in POINTERS:
            signature[name] = POINTERS[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        else:
            signature[name] = SCALARS[name]
    return triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32))


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ("bf16", "fp32"))
def test_kernels_compile_for_sm90(dtype):
    nested = dtype == "bf16"
    matmul = compile_for_h100(kernels._nf4_matmul_kernel, dtype, {
        "NESTED": nested, "HAS_BIAS": True, "INTERPRET_BF16": False, "BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64},
        nested)
    grad_input = compile_for_h100(kernels._nf4_matmul_grad_input_kernel, dtype, {
        "NESTED": nested, "INTERPRET_BF16": False, "BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128}, nested)
    dequantize = compile_for_h100(kernels._nf4_dequantize_kernel, dtype, {"NESTED": nested, "BLOCK": 1024}, nested)
    for compiled in (matmul, grad_input, dequantize):
        assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    if dtype == "bf16":  # half-precision tiles go to Hopper's tensor cores; fp32 stays IEEE (no TF32) by design
        assert "wgmma" in matmul.asm["ptx"]  # 64-row tiles: warpgroup MMA
        assert "mma" in grad_input.asm["ptx"]  # 16-row tiles: mma.sync


@pytest.mark.slow
@pytest.mark.parametrize("epilogue", ("DOWN", "RESIDUAL", "ACT_GRAD"))
def test_bottleneck_kernel_compiles_for_sm90(epilogue):
    from fastft.kernels import bottleneck

    kernel = bottleneck._bottleneck_matmul_kernel
    constexprs = {"EPILOGUE": getattr(bottleneck, epilogue), "ACTIVATION": 1, "HAS_BIAS": epilogue != "ACT_GRAD",
                  "INTERPRET_BF16": False, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}
    scalars = {"scale": "fp32"}
    signature = {name: "constexpr" if name in constexprs else "*bf16" if name.endswith("_ptr")
                 else scalars.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and "wgmma" in compiled.asm["ptx"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ("FORWARD_KL", "REVERSE_KL", "MIXTURE"))
def test_distillation_kernel_compiles_for_sm90(mode):
    from fastft.kernels import distillation

    kernel = distillation._distill_soft_rows_kernel
    constexprs = {"MODE": getattr(distillation, mode), "WANT_GRAD": True, "BLOCK_V": 1024}
    floats = {"inv_t", "beta", "log_b", "log_1mb", "grad_scale"}
    signature = {name: "constexpr" if name in constexprs else "*fp32" if name.endswith("_ptr")
                 else "fp32" if name in floats else "i32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ("bf16", "fp32"))
@pytest.mark.parametrize("backward", (False, True))
def test_qat_kernel_compiles_for_sm90(dtype, backward):
    from fastft.kernels import qat

    kernel = qat._fake_quantize_kernel
    constexprs = {"SYMMETRIC": dtype == "bf16", "BACKWARD": backward, "BLOCK_G": 64, "BLOCK_K": 32}
    scalars = {"n_groups": "i32", "group": "i32", "qmin": "fp32", "qmax": "fp32", "eps": "fp32"}
    signature = {name: "constexpr" if name in constexprs else f"*{dtype}" if name.endswith("_ptr")
                 else scalars[name] for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    assert compiled.asm["cubin"] and "div.rn.f32" in compiled.asm["ptx"]


@pytest.mark.slow
@pytest.mark.parametrize("kernel_name", ("_lora_down_kernel", "_lora_grad_x_kernel", "_lora_grad_a_kernel"))
@pytest.mark.parametrize("dtype", ("bf16", "fp32"))
def test_lora_kernels_compile_for_sm90(kernel_name, dtype):
    from fastft.kernels import lora

    kernel = getattr(lora, kernel_name)
    constexprs = {"DROPOUT": True, "INTERPRET_BF16": False, "BLOCK_M": 64, "BLOCK_R": 16, "BLOCK_K": 64}
    pointers = {"seed_ptr": "*i64", "offsets_ptr": "*i32"}
    scalars = {"threshold": "i64", "keep_scale": "fp32"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, f"*{dtype}") if name.endswith("_ptr")
                 else scalars.get(name, "i32") for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32))
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    if dtype == "bf16":
        assert "mma" in compiled.asm["ptx"]  # the rank-r products run on tensor cores


@pytest.mark.slow
@pytest.mark.parametrize("backward", (False, True))
@pytest.mark.parametrize("zero_point", (False, True))
def test_learned_scale_qat_kernel_compiles_for_sm90(backward, zero_point):
    from fastft.kernels import qat

    kernel = qat._fake_quantize_scaled_kernel
    constexprs = {"HAS_ZERO_POINT": zero_point, "BACKWARD": backward, "BLOCK_G": 64, "BLOCK_K": 32}
    pointers = {"scale_ptr": "*fp32", "grad_scale_ptr": "*fp32", "zero_point_ptr": "*fp32",
                "grad_zero_point_ptr": "*fp32"}
    scalars = {"n_groups": "i32", "group": "i32", "qmin": "fp32", "qmax": "fp32"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "*bf16") if name.endswith("_ptr")
                 else scalars[name] for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    assert compiled.asm["cubin"] and "div.rn.f32" in compiled.asm["ptx"]


@pytest.mark.slow
@pytest.mark.parametrize("kernel_name", ("_fake_quant_matmul_kernel", "_fake_quant_matmul_grad_x_kernel",
                                         "_fake_quant_matmul_grad_w_kernel", "_qparams_kernel"))
def test_fused_fake_quant_linear_kernels_compile_for_sm90(kernel_name):
    from fastft.kernels import qat

    kernel = getattr(qat, kernel_name)
    constexprs = {"QUANTIZE_X": True, "QUANTIZE_W": True, "HAS_BIAS": True, "INTERPRET_BF16": False, "BLOCK_M": 64,
                  "BLOCK_N": 64, "BLOCK_K": 64, "SYMMETRIC": False, "BLOCK_G": 1}
    constexprs = {name: value for name, value in constexprs.items() if name in kernel.arg_names}
    floats = {"a_qmin", "a_qmax", "w_qmin", "w_qmax", "qmin", "qmax", "eps"}
    pointers = {"x_scale_ptr": "*fp32", "x_zero_ptr": "*fp32", "w_scale_ptr": "*fp32", "scale_ptr": "*fp32",
                "zero_point_ptr": "*fp32"}
    signature = {name: "constexpr" if name in constexprs else pointers.get(name, "*bf16") if name.endswith("_ptr")
                 else "fp32" if name in floats else "i32" for name in kernel.arg_names}
    compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                              target=GPUTarget("cuda", 90, 32), options={"enable_fp_fusion": False})
    assert compiled.asm["cubin"] and ".target sm_90" in compiled.asm["ptx"]
    if kernel_name != "_qparams_kernel":
        assert "mma" in compiled.asm["ptx"]  # bf16 tiles, fake-quantized in registers, on tensor cores
