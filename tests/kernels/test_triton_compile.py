"""Every Triton kernel of kernels/ compiles ahead of time for A100 (sm_80) and H100/H200 (sm_90), without a GPU, at
every configuration its launcher or autotuner can pick (fastft.bench.gpu_compile: a representative set here, every
dtype and flag in `fastft bench --suite gpu-compile`), within the target's shared memory (163 / 227 KB a block),
with no register spills above gpu_compile.SPILL_BUDGET bytes, and with tl.dot on tensor cores. Run time: ~3 s a compile, a few minutes in all on a CI runner.

The interpreter tests check the arithmetic; this checks what only the real compiler sees."""

import os

import pytest

if os.environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("compiles for real GPUs: run without TRITON_INTERPRET", allow_module_level=True)

from fastft.bench import gpu_compile  # noqa: E402


@pytest.fixture(scope="module")
def results():
    return gpu_compile.sweep(full=False)


@pytest.mark.slow
@pytest.mark.parametrize("arch", (80, 90))
def test_every_configuration_compiles_and_fits(results, arch):
    ours = [r for r in results if r.arch == arch]
    assert len(ours) >= 50  # every tuned list's configurations, not one config per kernel
    bad = [f"{r.status} {r.kernel} [{r.config}] {r.dtype}: {r.error or f'smem {r.smem} B'}"
           for r in ours if r.error or r.smem > gpu_compile.SMEM_LIMIT[arch]]
    assert not bad, "\n".join(bad)
    assert all(r.regs > 0 and r.spill >= 0 for r in ours)  # ptxas reported (no cached compile)


@pytest.mark.slow
@pytest.mark.parametrize("arch", (80, 90))
def test_no_launch_spills_registers(results, arch):
    """fp32 included: TF32x3 tiles take 8 warps and 32-deep reductions (see the config lists in kernels/)."""
    spilling = [f"{r.kernel} [{r.config}] {r.dtype}: {r.spill} B" for r in results
                if r.arch == arch and r.spill > gpu_compile.SPILL_BUDGET]
    assert not spilling, "\n".join(spilling)


@pytest.mark.slow
def test_gemms_run_on_tensor_cores(results):
    """Every tl.dot lowers to MMA instructions, fp32 included (TF32): warpgroup MMA on sm_90 at 64 / 128-row
    tiles, mma.sync on sm_80; never CUDA-core FMAs."""
    dots = [r for r in results if r.dot != "-"]
    assert dots
    assert not [r for r in dots if r.dot == "fma"]
    assert all(r.dot == "mma" for r in dots if r.arch == 80)
    wide = [r for r in dots if r.arch == 90 and ("BM=64" in r.config or "BM=128" in r.config)
            and "lora" not in r.kernel]
    assert wide and all(r.dot == "wgmma" for r in wide), [r.config for r in wide if r.dot != "wgmma"][:5]
