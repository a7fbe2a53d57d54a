#!/usr/bin/env bash
# Prepares the GPU check's carry on this (CPU) machine, at no device time:
#   .gpu/_C.abi3.so  fastres._C built against the GPU image's torch (2.11.0+cu130,
#                    scripts/gpu_image.txt) for sm_90 (the H200), by the set-up of
#                    scripts/test_gpuimage.sh in .gpuimage/ (without its tests);
#   .whl/            the nvidia-cutlass wheel (the image has no CUTLASS headers: a
#                    build there, if the prebuilt extension does not load, needs it).
# The two device calls of scripts/gpu_check.sh then carry [".whl", ".gpu"].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .gpu .whl
TORCH_CUDA_ARCH_LIST=9.0 FASTRES_SETUP_ONLY=1 bash scripts/test_gpuimage.sh
cp .gpuimage/src/fastres/_C.abi3.so .gpu/_C.abi3.so
# shellcheck disable=SC1091
. .gpuimage/venv/bin/activate
(cd .gpuimage/src && python -c "import sys, fastres, torch; d = fastres.info(); \
print('torch', torch.__version__, 'cuda kernels', d['cuda_kernels'], d['cuda_arch_list']); \
sys.exit(not (d['cuda_kernels'] and d['cuda_arch_list'] == ['9.0']))")
rm -f .whl/nvidia_cutlass-*.whl
version=$(python -c 'import importlib.metadata as m; print(m.version("nvidia-cutlass"))')
python -m pip download -q --no-deps --only-binary=:all: -d .whl "nvidia-cutlass==$version"
ls -la .gpu/_C.abi3.so .whl/
