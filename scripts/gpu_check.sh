#!/usr/bin/env bash
# The project's GPU check, made for one call on a lent GPU machine (< 8 minutes
# on an H100): versions, carried wheels, build for the GPU's architecture, the
# test suite on the GPU, compute-sanitizer on every CUDA kernel, the quick
# benchmark. Results go to $OUT (default ./gpu-out), at most 8 files (what a
# lent machine returns): summary.log (versions and one line per step),
# steps.log (every step's full output; the tune step's table of per-shape
# choices is there), conv.json, bench/ (the benchmark's results.json, report.md
# and plots).
#
#   bash scripts/gpu_check.sh            # everything
#   STEPS="build tests" bash scripts/gpu_check.sh
#
# The GPU image has no nvidia-cutlass (the conv kernels' headers) and no
# network: carry its wheel, made here with
#   pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass
# (.whl/ is git-ignored; name it in the device call's carry list).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
STEPS=${STEPS:-"build tests sanitize conv tune bench"}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# A fresh table of per-shape choices (fastres.tune), measured by this run.
export FASTRES_TUNE_CACHE=${FASTRES_TUNE_CACHE:-/tmp/fastres-gpu-check-tune.json}
rm -f "$FASTRES_TUNE_CACHE"

{
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2
} 2>&1 | tee "$OUT/summary.log"

if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried for packages the image lacks
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi

cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -n 1)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$cap} MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc)")")}

summary=()
step() {  # step NAME TIMEOUT_S COMMAND...: runs it, appends to steps.log, records rc and time
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "== $name: $*" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" >"$OUT/step.tmp" 2>&1
  rc=$?
  cat "$OUT/step.tmp" >>"$OUT/steps.log"
  tail -n 15 "$OUT/step.tmp"
  rm -f "$OUT/step.tmp"
  summary+=("$(printf '%-10s rc=%-4s %5ss' "$name" "$rc" $((SECONDS - t0)))")
}

step build 240 python3 setup.py build_ext --inplace
step tests 240 python3 -m pytest tests -q -rs -p no:cacheprovider
step sanitize 180 bash -c '
  set -e
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py cuda
  compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitize_cases.py cuda
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py cuda-conv
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py triton'
step conv 240 python3 -m benchmarks.gpu_conv --batches 64 --out "$OUT/conv.json"
step tune 200 bash -c '
  set -e
  python3 -m benchmarks.gpu_conv --bench-only --arch resnext50_32x4d --batches 64 --rep-ms 50
  python3 -m fastres.tune --show'
step bench 240 python3 -m benchmarks --time-limit 180 --out "$OUT/bench"

echo "== summary ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1))"
printf "%s\n" "${summary[@]}" | tee -a "$OUT/summary.log"
