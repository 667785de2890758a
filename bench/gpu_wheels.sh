#!/usr/bin/env bash
# Downloads, on a machine with network, the wheels of the GPU check's peers at the tested versions (constraints.txt)
# into .whl/, for a GPU machine without network whose Python already holds a CUDA torch, Triton, transformers and
# their dependencies: bitsandbytes, peft, Liger-Kernel and torchao (~49 MB). bench/gpu_check.sh installs them from
# there into a private folder.
#   bench/gpu_wheels.sh [python version of the GPU machine, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:-3.12}
mkdir -p .whl
for name in bitsandbytes peft liger_kernel torchao; do
  pin=$(grep -i "^${name}==" constraints.txt)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl "$pin"
done
ls -l .whl
