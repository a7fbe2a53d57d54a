#!/usr/bin/env bash
# Sets up an environment for fastres and builds its extension; sourced by
# scripts/test.sh and scripts/bench.sh.
#
# Uses the active virtualenv if there is one, else creates ./.venv. Installs
# torch (a CUDA build: the extension's CUDA kernels compile even without a GPU;
# the newest pip serves, or the versions of $FASTRES_CONSTRAINTS),
# the test/benchmark dependencies, and builds fastres._C with nvcc when found.
# TORCH_CUDA_ARCH_LIST defaults to this machine's GPU, or 9.0 without a GPU
# (one architecture keeps CI builds short; `pip install .` alone builds
# 8.0;8.6;8.9;9.0).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ -z "${VIRTUAL_ENV:-}" ]; then
  [ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
  # shellcheck disable=SC1091
  . .venv/bin/activate
fi

# FASTRES_CONSTRAINTS: a pip constraints file pinning the versions (scripts/gpu_image.txt).
python -m pip install -q --disable-pip-version-check ${FASTRES_CONSTRAINTS:+-c "$FASTRES_CONSTRAINTS"} \
  "torch>=2.11" "torchvision>=0.26" "triton>=3.6" setuptools wheel ninja nvidia-cutlass \
  pytest pytest-benchmark expecttest hypothesis numpy tqdm matplotlib timm \
  onnx onnxruntime onnxscript

if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
if [ -z "${TORCH_CUDA_ARCH_LIST:-}" ]; then
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -n 1 || true)
  export TORCH_CUDA_ARCH_LIST="${cap:-9.0}"
fi
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
python -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
python -m fastres.info
