#!/usr/bin/env bash
# The test suite on the GPU image's version set (scripts/gpu_image.txt: Python
# 3.12, torch 2.11.0, torchvision 0.26.0, triton 3.6.0), the second half of CI
# (.ci/run) after scripts/test.sh's latest versions.
#
# Works in .gpuimage/ (git-ignored): a copy of this checkout (tracked and
# untracked, not ignored, files) in .gpuimage/src, so that its in-place build of
# fastres._C against torch 2.11 leaves ./fastres/_C*.so (built for ./.venv's
# torch) alone, and a virtualenv .gpuimage/venv on Python 3.12: $PYTHON312,
# else python3.12 on PATH, else pyenv's newest 3.12; without any, this
# machine's python3 (said below). Arguments go to pytest, as for test.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
root=$PWD

py=
for candidate in "${PYTHON312:-}" python3.12 \
  "$(command -v pyenv >/dev/null && ls -d "$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -n 1)"; do
  # (a pyenv shim python3.12 exists but fails unless 3.12 is selected: try each)
  if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
    py=$candidate
    break
  fi
done
if [ -z "$py" ]; then
  py=python3
  echo "test_gpuimage.sh: no Python 3.12 found (PYTHON312, python3.12, pyenv); using $(python3 --version)" >&2
fi

mkdir -p .gpuimage/src  # a fresh copy each run; its build/ stays for incremental builds
find .gpuimage/src -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t .gpuimage/src
[ -x .gpuimage/venv/bin/python ] || "$py" -m venv .gpuimage/venv
# shellcheck disable=SC1091
. .gpuimage/venv/bin/activate
echo "test_gpuimage.sh: $(python --version) in .gpuimage/venv, constraints scripts/gpu_image.txt"
export FASTRES_CONSTRAINTS="$root/scripts/gpu_image.txt"
if [ -n "${FASTRES_SETUP_ONLY:-}" ]; then  # scripts/gpu_prebuild.sh: the set-up and build, no tests
  exec bash .gpuimage/src/scripts/setup.sh
fi
exec bash .gpuimage/src/scripts/test.sh "$@"
