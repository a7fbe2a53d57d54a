"""The kernel microbenchmarks through pytest-benchmark: the same cases and providers
as ``python -m benchmarks --suite ops conv`` (``benchmarks/cases.py``, configured by
``benchmarks/config.py``), one test per (case, provider).

    pytest benchmarks/test_bench_kernels.py                         # quick cases, this machine's device
    FASTRES_BENCH_FULL=1 pytest benchmarks/test_bench_kernels.py    # every case
    pytest benchmarks/test_bench_kernels.py -k "conv and fastres" --benchmark-json kernels.json

Not collected by the project's test suite (``testpaths = ["tests"]``). Each
round is one call followed by ``torch.cuda.synchronize``, timed on the host by
pytest-benchmark; on a GPU the L2 cache is flushed (a 256 MB buffer zeroed) in
the untimed setup before every round, as ``triton.testing.do_bench`` does. The
host timer adds launch and synchronization overhead (some microseconds) that
``python -m benchmarks`` (CUDA events) does not: prefer it for small kernels.
"""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from benchmarks import cases, config  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CONFIG = config.default_config(DEVICE.type, full=os.environ.get("FASTRES_BENCH_FULL", "0") == "1")
DTYPE = getattr(torch, CONFIG.dtype)
COMPILE = bool(CONFIG.compile_modes)
CASES = [c for suite in ("ops", "conv") for c in config.kernel_cases(CONFIG, suite)]
PARAMS = [pytest.param(case, provider, id=f"{case.id}-{provider}")
          for case, provider in cases.iter_case_providers(CASES, DEVICE, compile=COMPILE)]


@pytest.fixture(scope="module")
def l2_flush():
    if DEVICE.type != "cuda":
        return lambda: None
    buf = torch.empty(256 * 2 ** 20, dtype=torch.int8, device=DEVICE)

    def flush():
        buf.zero_()
        torch.cuda.synchronize()

    return flush


@pytest.mark.parametrize("case,provider", PARAMS)
def test_kernel(benchmark, l2_flush, case, provider):
    if COMPILE:
        torch._dynamo.reset()
    fn, backend = cases.providers(case, DEVICE, DTYPE, compile=COMPILE)[provider]
    sync = torch.cuda.synchronize if DEVICE.type == "cuda" else (lambda: None)

    def once():
        fn()
        sync()

    benchmark.group = f"{case.op} N={case.batch} {case.label}"
    benchmark.extra_info.update({
        "op": case.op, "case": case.label, "source": case.source, "batch": case.batch, "provider": provider,
        "backend": backend, "dtype": CONFIG.dtype, "layout": "channels_last", "device": DEVICE.type,
        "gflop": case.flops / 1e9, "min_bytes": case.min_bytes(DTYPE),
    })
    with torch.no_grad():
        once()  # compile / autotune outside the timed rounds
        benchmark.pedantic(once, setup=l2_flush, rounds=20 if DEVICE.type == "cuda" else 5, warmup_rounds=1,
                           iterations=1)
