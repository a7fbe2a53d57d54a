#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs fastres's main job: the benchmark of the
# fused ops against stock PyTorch on this machine's GPU, or its CPU without one.
# Results (JSON, Markdown) go to ./bench-results unless --out is given.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
. scripts/setup.sh
python -m benchmarks "$@"
