#!/usr/bin/env bash
# The GPU check of fastft, one command on a CUDA machine (sized for < 8 minutes on one H100/H200):
#   bench/gpu_check.sh
# Python: $PY if set, else .venv/bin/python (after `make install` with a CUDA build of torch), else the machine's
# python3 with its own CUDA torch, Triton and transformers (a GPU machine without network): fastft then runs from
# this checkout without its C++ extension (CPU kernels only; this check runs the Triton ones), and the peers' wheels
# that bench/gpu_wheels.sh saved in .whl/ are installed into a private folder first. Steps:
# 1. the Triton tests (tests/ops -m triton_interpreter: reference vs Triton, every op, fp32 / fp16 / bf16) on CUDA
#    tensors (FASTFT_TEST_DEVICE=cuda), autotuning on;
# 2. the same kernels at the heuristic configurations (FASTFT_AUTOTUNE=0), the NF4 and LoRA tests only, then the
#    kernels on tensors of more than 2^31 elements (tests/ops/test_large_offsets_cuda.py, ~40 GiB of GPU memory);
# 3. the GPU benchmark suite (fastft/bench/gpu.py): time, TFLOP/s or GB/s against the measured peak, peak memory,
#    against bitsandbytes / torchao / peft / Liger / plain torch; results under bench/results/gpu-<date>/ (JSON +
#    Markdown), or under $OUT when it is set.
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
if ! $PY -P -c 'import fastft.kernels' 2>/dev/null; then
  # fastft from this checkout: a package folder of links to fastft/ with kernels/ as fastft.kernels.
  site=${TMPDIR:-/tmp}/fastft-gpu-site
  rm -rf "$site" && mkdir -p "$site/fastft"
  for entry in fastft/*; do ln -s "$PWD/$entry" "$site/fastft/"; done
  ln -s "$PWD/kernels" "$site/fastft/kernels"
  if compgen -G ".whl/*.whl" > /dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" .whl/*.whl || exit 1
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# -P: the checkout's root stays off sys.path (its fastft/ folder lacks fastft.kernels, its kernels/ is no package).
PYTEST=${PYTEST:-$PY -P -m pytest}
OUT_DIR=${OUT:-bench/results/gpu-$(date -u +%Y%m%d-%H%M)}
mkdir -p "$OUT_DIR"
status=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
$PY -P -c 'import torch, triton, fastft; print("torch", torch.__version__, "cuda", torch.version.cuda, "triton",
triton.__version__, "fastft", fastft.__file__)' | tee -a "$OUT_DIR/gpu.txt" || exit 1
echo "== 1. the Triton tests on CUDA (autotuned)"
FASTFT_TEST_DEVICE=cuda timeout 240 $PYTEST -q -p no:cacheprovider tests/ops -m triton_interpreter \
  --ignore=tests/ops/test_large_offsets_cuda.py --junitxml="$OUT_DIR/tests-cuda.xml" 2>&1 \
  | tee "$OUT_DIR/tests-cuda.txt" || status=1
echo "== 2. NF4 / LoRA tests at the heuristic configurations; tensors of more than 2^31 elements"
FASTFT_TEST_DEVICE=cuda FASTFT_AUTOTUNE=0 timeout 90 $PYTEST -q -p no:cacheprovider tests/ops/test_nf4_triton.py \
  tests/ops/test_lora_triton.py 2>&1 | tee "$OUT_DIR/tests-heuristic.txt" || status=1
FASTFT_TEST_DEVICE=cuda FASTFT_AUTOTUNE=0 timeout 120 $PYTEST -q -p no:cacheprovider \
  tests/ops/test_large_offsets_cuda.py 2>&1 | tee "$OUT_DIR/tests-large-offsets.txt" || status=1
echo "== 3. benchmarks on CUDA"
timeout 150 $PY -P -m fastft.bench.gpu "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench.txt" || status=1
echo "results in $OUT_DIR (exit $status)"
exit $status
