#!/usr/bin/env bash
# The project's GPU check, made for one lease on the lent GPU machine (H200,
# Python 3.12, torch 2.11.0+cu130, triton 3.6.0, nvcc 13.0): two calls of the
# device tool, each under its 10-minute limit.
#
#   bash scripts/gpu_check.sh verdict   # call 1, <= 8 min: build (or the prebuilt
#                                       # extension), the Hopper conv kernels' tests and
#                                       # compute-sanitizer first, then the GPU tests,
#                                       # compute-sanitizer, conv check; warms the
#                                       # Triton cache
#   bash scripts/gpu_check.sh bench     # call 2: the quick benchmark, on the warm cache
#   STEPS="tests sanitize" bash scripts/gpu_check.sh   # chosen steps
#
# Prepared on the CPU machine first (no device time): `bash scripts/gpu_prebuild.sh`
# builds fastres._C against the image's torch (scripts/gpu_image.txt) for sm_90
# into .gpu/_C.abi3.so and downloads the nvidia-cutlass wheel (the image has none)
# into .whl/; both folders are git-ignored and travel through the call's carry.
# The device tool's calls (README, "GPU check"):
#
#   run(command="bash scripts/gpu_check.sh verdict", carry=[".whl", ".gpu"], timeout_s=540)
#   # copy triton-cache.tgz from the reply's files into .gpu/ (the next machine may be fresh)
#   run(command="bash scripts/gpu_check.sh bench", carry=[".whl", ".gpu"], timeout_s=600)
#
# The extension is abi3 and built against torch 2.11.0+cu130 for sm_90: it is
# used if it loads with its CUDA kernels, else built there (~1-2 min on 16 cores).
# The Triton cache (compiled kernels and autotune results, TRITON_CACHE_AUTOTUNING)
# lives in .gpu/triton-cache (kept between calls on a warm machine) and goes back
# in $OUT/triton-cache.tgz (for a fresh one). Results go to $OUT (default
# ./gpu-out), at most 8 files: summary.log (versions, the verdict table),
# steps.log (every step's output), conv.json, triton-cache.tgz, bench/.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT" .gpu
case "${1:-}" in
  verdict) STEPS=${STEPS:-"build sm90 tests sanitize conv warm"}; BUDGET=${BUDGET:-470} ;;
  bench) STEPS=${STEPS:-"build tune bench"}; BUDGET=${BUDGET:-570} ;;
  "") STEPS=${STEPS:-"build sm90 tests sanitize conv warm"}; BUDGET=${BUDGET:-470} ;;
  *) echo "usage: bash scripts/gpu_check.sh [verdict|bench]" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TRITON_CACHE_DIR="$PWD/.gpu/triton-cache" TRITON_CACHE_AUTOTUNING=1
if [ -f .gpu/triton-cache.tgz ] && [ ! -d .gpu/triton-cache ]; then
  tar -xzf .gpu/triton-cache.tgz -C .gpu
fi
# A fresh table of per-shape choices (fastres.tune), measured by the tune step.
export FASTRES_TUNE_CACHE=${FASTRES_TUNE_CACHE:-$PWD/.gpu/tune.json}

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

# Steps after the current one, with the seconds each needs at least: the tests
# get what is left of BUDGET once these are set aside.
declare -A RESERVE=([build]=0 [sm90]=0 [tests]=0 [sanitize]=75 [conv]=45 [warm]=40 [tune]=0 [bench]=300)
rows=()
step() {  # step NAME TIMEOUT_S COMMAND...: runs it with the timeout, cut to the budget left
  local name=$1 limit=$2 t0=$SECONDS rc verdict later=0 s
  shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  for s in $STEPS; do  # the reserves of the steps after this one
    [[ " $STEPS " == *" $name "*" $s "* ]] && later=$((later + ${RESERVE[$s]:-0}))
  done
  local left=$((BUDGET - SECONDS - later))
  ((limit > left)) && limit=$left
  if ((limit < 10)); then
    rows+=("$(printf '%-9s %-7s %5s  %s' "$name" SKIP 0 "no time left in the ${BUDGET}s budget")")
    return 0
  fi
  echo "== $name (${limit}s): $*" | tee -a "$OUT/steps.log"
  timeout "$limit" "$@" >"$OUT/step.tmp" 2>&1
  rc=$?
  cat "$OUT/step.tmp" >>"$OUT/steps.log"
  tail -n 12 "$OUT/step.tmp"
  case $rc in 0) verdict=PASS ;; 124 | 137) verdict=TIMEOUT ;; 77) verdict=SKIP ;; *) verdict=FAIL ;; esac
  local detail
  detail=$(grep -E "^(=+ )?[0-9]+ (passed|failed)|[0-9]+ (passed|failed|error)" "$OUT/step.tmp" | tail -n 1 | tr -d '=' | xargs)
  rm -f "$OUT/step.tmp"
  rows+=("$(printf '%-9s %-7s %5s  rc=%s %s' "$name" "$verdict" $((SECONDS - t0)) "$rc" "$detail")")
}

build() {  # the carried prebuilt extension if it loads with CUDA kernels, else a build here
  if [ -f .gpu/_C.abi3.so ]; then
    cp .gpu/_C.abi3.so fastres/_C.abi3.so
    if python3 -c "import fastres, sys; d = fastres.info(); print(d); sys.exit(0 if d['cuda_kernels'] and 'cuda' in d['backends'] else 1)"; then
      echo "using the prebuilt .gpu/_C.abi3.so"
      return 0
    fi
    echo "the prebuilt extension does not load here: building"
    rm -f fastres/_C.abi3.so
  fi
  python3 setup.py build_ext --inplace && python3 -m fastres.info
}
export -f build

pytest_args=(-q -rfE -p no:cacheprovider --durations=10)
python3 -c "import xdist" 2>/dev/null && pytest_args+=(-n 8 --dist loadfile)

step build 240 bash -c build
# The CUTLASS sm90 conv kernels first: their tests, then every conv kernel under
# memcheck (scripts/sanitize_cases.py runs the Hopper tiles before the others).
step sm90 120 bash -c '
  set -e
  python3 -m pytest tests/test_cuda_sm90.py -q -rfE -p no:cacheprovider
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py cuda-conv'
step tests 400 python3 -m pytest tests "${pytest_args[@]}"
step sanitize 120 bash -c '
  set -e
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py cuda
  compute-sanitizer --tool racecheck --error-exitcode 9 python3 scripts/sanitize_cases.py cuda
  compute-sanitizer --tool memcheck --error-exitcode 9 python3 scripts/sanitize_cases.py triton'
step conv 90 python3 -m benchmarks.gpu_conv --batches 64 --out "$OUT/conv.json"
# Compiles and autotunes the benchmark's Triton kernels into the cache for call 2.
step warm 90 python3 -m benchmarks --suite ops conv --time-limit 60 --json-only --no-plots --out /tmp/warm
# Per-shape backend choices (fastres.tune) for ResNeXt-50's convs, then their table.
step tune 150 bash -c '
  set -e
  rm -f "$FASTRES_TUNE_CACHE"
  python3 -m benchmarks.gpu_conv --bench-only --arch resnext50_32x4d --batches 64 --rep-ms 50
  python3 -m fastres.tune --show'
step bench 560 python3 -m benchmarks --time-limit 360 --out "$OUT/bench"

if [[ " $STEPS " == *" warm "* ]] && [ -d .gpu/triton-cache ]; then
  tar -czf "$OUT/triton-cache.tgz" -C .gpu triton-cache
  size=$(stat -c %s "$OUT/triton-cache.tgz")
  if ((size > 16 * 1024 * 1024)); then  # the device tool returns files up to 16 MiB
    rm -f "$OUT/triton-cache.tgz"
    rows+=("$(printf '%-9s %-7s %5s  %s' cache SKIP 0 "triton-cache.tgz is $((size >> 20)) MiB > 16: stays on the machine only")")
  fi
fi

{
  echo "== verdict ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1), $((SECONDS))s of ${BUDGET}s)"
  printf '%-9s %-7s %5s  %s\n' step verdict secs detail
  printf '%s\n' "${rows[@]}"
} | tee -a "$OUT/summary.log"
! printf '%s\n' "${rows[@]}" | grep -qE " (FAIL|TIMEOUT) "
