#!/usr/bin/env bash
# Prepares the GPU check's carry on this (CPU) machine, at no device time:
#   .gpu/_C.abi3.so  fastres._C built against the GPU image's torch (2.11.0+cu130,
#                    scripts/gpu_image.txt) for sm_90, in the .gpuimage/ set-up of
#                    scripts/test_gpuimage.sh (made here if missing, without the tests);
#   .whl/            the nvidia-cutlass wheel (the image has no CUTLASS headers: a
#                    build there needs it).
# Then the two device calls of scripts/gpu_check.sh carry [".whl", ".gpu"].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
mkdir -p .gpu .whl
if [ ! -f .gpuimage/venv/bin/activate ]; then
  FASTRES_SETUP_ONLY=1 bash scripts/test_gpuimage.sh
fi
# shellcheck disable=SC1091
. .gpuimage/venv/bin/activate
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t .gpuimage/src
(cd .gpuimage/src && CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=9.0 \
  MAX_JOBS=${MAX_JOBS:-$(nproc)} python setup.py build_ext --inplace)
cp .gpuimage/src/fastres/_C.abi3.so .gpu/_C.abi3.so
python -c "import sys; sys.path.insert(0, '.gpuimage/src'); import fastres, torch; d = fastres.info(); \
print('torch', torch.__version__, 'cuda kernels', d['cuda_kernels'], d['cuda_arch_list']); sys.exit(not d['cuda_kernels'])"
rm -f .whl/nvidia_cutlass-*.whl
python -m pip download -q --no-deps --only-binary=:all: -d .whl "nvidia-cutlass==$(python -c \
  'import importlib.metadata as m; print(m.version("nvidia-cutlass"))')"
ls -la .gpu/_C.abi3.so .whl/
