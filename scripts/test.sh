#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite. Without a GPU the
# Triton kernels run under the Triton interpreter (tests/conftest.py sets
# TRITON_INTERPRET=1), and the CUDA kernels are compiled and registered but
# only their host-side behaviour is tested.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
python - <<'PY'
import fastres, sys
d = fastres.info()
if not d["cuda_kernels"] and not __import__("os").environ.get("FASTRES_BUILD_CUDA") == "0":
    sys.exit(f"the CUDA extension did not build with its CUDA kernels: {d['unavailable'].get('cuda')}")
PY
python -m pytest -q "$@"
