"""Timing and environment helpers shared by every benchmark.

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed before each run,
warm-up, median with p20/p80). CPU: the same statistics from a host timer.
Every provider of a case is measured in the same process, one after the
other, so ratios compare like with like.
"""
from __future__ import annotations

import os
import platform
import subprocess
import time
from typing import Callable, Dict

import torch

QUANTILES = (0.5, 0.2, 0.8)


def bench(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> Dict[str, float]:
    """Median, p20 and p80 run time of ``fn`` in milliseconds."""
    if device.type == "cuda":
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES))
        return {"ms": med, "ms_p20": p20, "ms_p80": p80}
    deadline = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < deadline:
        fn()
    times = []
    deadline = time.perf_counter() + rep_ms / 1e3
    while time.perf_counter() < deadline or len(times) < 5:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return {"ms": q[0].item(), "ms_p20": q[1].item(), "ms_p80": q[2].item()}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device)
    return 2 * n / (t["ms"] * 1e-3) / 1e9


def environment(device: torch.device) -> Dict[str, object]:
    """What every result row records about the machine and the software."""
    import fastres

    info = fastres.info()
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": info["triton"],
        "fastres": info["version"],
        "fastres_commit": commit,
        "cuda_kernels": info["cuda_kernels"],
        "threads": torch.get_num_threads(),
    }


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
