#!/usr/bin/env bash
# The GPU check of fastft, one command on a CUDA machine (sized for < 8 minutes on one H100/H200):
#   bench/gpu_check.sh            (after `make install` with a CUDA build of torch)
# 1. the Triton tests (tests/ops -m triton_interpreter: reference vs Triton, every op, fp32 / fp16 / bf16) on CUDA tensors
#    (FASTFT_TEST_DEVICE=cuda), autotuning on;
# 2. the same kernels at the heuristic configurations (FASTFT_AUTOTUNE=0), the NF4 and LoRA tests only;
# 3. the GPU benchmark suite (fastft/bench/gpu.py): time, TFLOP/s or GB/s against the measured peak, peak memory,
#    against bitsandbytes / torch / peft-style torch; results under bench/results/gpu-<date>/ (JSON + Markdown).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTEST=${PYTEST:-.venv/bin/pytest}
PY=${PY:-.venv/bin/python}
OUT=bench/results/gpu-$(date -u +%Y%m%d-%H%M)
mkdir -p "$OUT"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch, triton; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)' | tee -a "$OUT/gpu.txt"
echo "== 1. the Triton tests on CUDA (autotuned)"
FASTFT_TEST_DEVICE=cuda timeout 240 $PYTEST -q tests/ops -m triton_interpreter --junitxml="$OUT/tests-cuda.xml" 2>&1 | tee "$OUT/tests-cuda.txt" || status=1
echo "== 2. NF4 / LoRA tests at the heuristic configurations"
FASTFT_TEST_DEVICE=cuda FASTFT_AUTOTUNE=0 timeout 90 $PYTEST -q tests/ops/test_nf4_triton.py tests/ops/test_lora_triton.py 2>&1 | tee "$OUT/tests-heuristic.txt" || status=1
echo "== 3. benchmarks on CUDA"
timeout 150 $PY -m fastft.bench.gpu "$OUT" 2>&1 | tee "$OUT/bench.txt" || status=1
echo "results in $OUT (exit $status)"
exit $status
