"""Timing, peak and environment helpers shared by every benchmark.

* :func:`bench` times one kernel call. GPU: ``triton.testing.do_bench`` (CUDA
  events, a 256 MB buffer zeroed before every call so that each run starts with
  a cold L2, warm-up, median with p20/p80). CPU: the same statistics from a
  host timer.
* :func:`time_iterations` times a whole model: warm-up, then several trials of
  ``n`` back-to-back iterations between two CUDA events (host timer on CPU),
  ``n`` chosen so that a trial lasts about ``trial_ms``; median, p20, p80 of
  the per-iteration time over the trials.
* :func:`order_check` tells whether a provider's CPU timing depends on which
  provider ran just before it (a third-party engine's spinning threads).
* :func:`copy_bandwidth` and :func:`matmul_tflops` measure the machine's peaks
  in the same run, so fractions of peak never rest on spec sheets or assumed
  clocks.

Every provider of a case is measured in the same process, one after the
other, so ratios compare like with like. Timers are read only after
``torch.cuda.synchronize`` (or ``Event.synchronize``).
"""
from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

QUANTILES = (0.5, 0.2, 0.8)


def _quantiles(times: List[float]) -> Dict[str, float]:
    q = torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return {"ms": q[0].item(), "ms_p20": q[1].item(), "ms_p80": q[2].item()}


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(fn: Callable[[], object], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100,
          min_reps: int = 5) -> Dict[str, float]:
    """Median, p20 and p80 run time of one call of ``fn``, in milliseconds.

    GPU: ``triton.testing.do_bench`` (L2 flushed before each call, CUDA events).
    CPU: host timer, at least ``min_reps`` calls and ``rep_ms`` of them.
    """
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
    while time.perf_counter() < deadline or len(times) < min_reps:
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(times)


def time_iterations(fn: Callable[[], object], device: torch.device, trials: int = 5, warmup: int = 2,
                    trial_ms: float = 200.0, max_iters: int = 100) -> Dict[str, float]:
    """Per-iteration time of ``fn`` (a model forward, a training step) in milliseconds.

    ``warmup`` untimed calls (at least one), then ``trials`` timed trials of
    ``n`` back-to-back calls, ``n`` chosen from the last warm-up call so that a
    trial takes about ``trial_ms`` (1 <= n <= ``max_iters``). GPU: CUDA events
    around each trial, read after the end event has completed; CPU: host timer.
    Returns median, p20, p80 over trials, and ``iters`` (n) and ``trials``.
    """
    for _ in range(max(1, warmup) - 1):
        fn()
    synchronize(device)
    t0 = time.perf_counter()
    fn()
    synchronize(device)
    estimate_ms = (time.perf_counter() - t0) * 1e3
    n = max(1, min(max_iters, round(trial_ms / max(estimate_ms, 1e-3))))
    times = []
    for _ in range(max(1, trials)):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n)
        else:
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            times.append((time.perf_counter() - t0) * 1e3 / n)
    return {**_quantiles(times), "iters": n, "trials": len(times)}


def bench_interleaved(fns: Dict[str, Callable[[], object]], warmup: int = 1, min_reps: int = 5,
                      rep_ms: float = 0.0) -> Dict[str, Dict[str, float]]:
    """Host-timer statistics of several providers measured in interleaved rounds (CPU).

    Each round calls every provider once, in turn (the first one rotating from
    round to round), so that load from other processes on a shared machine
    falls on all providers alike instead of on whichever ran while it lasted. Rounds go on until every provider has
    ``min_reps`` samples and ``rep_ms`` per provider has passed. Median, p20,
    p80 per provider, in milliseconds.
    """
    for fn in fns.values():
        for _ in range(max(1, warmup)):
            fn()
    times: Dict[str, List[float]] = {name: [] for name in fns}
    order = list(fns.items())
    deadline = time.perf_counter() + rep_ms * len(fns) / 1e3
    rnd = 0
    while min(len(t) for t in times.values()) < min_reps or time.perf_counter() < deadline:
        k = rnd % len(order)  # rotate who goes first, so that no provider always follows the same one
        for name, fn in order[k:] + order[:k]:
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
        rnd += 1
    return {name: {**_quantiles(t), "iters": 1, "trials": len(t)} for name, t in times.items()}


def order_check(fn: Callable[[], object], engines: Sequence[Callable[[], object]],
                stock: Sequence[Callable[[], object]], min_reps: int = 5) -> Dict[str, float]:
    """Whether ``fn``'s timing depends on what ran just before it (CPU): in each round ``fn`` is
    timed once right after each of ``stock`` (in-process PyTorch providers) and once right after
    each of ``engines`` (third-party engines whose threads might keep spinning). Both kinds evict
    the caches alike, so what differs is only the engine's threads. ``ratio``: the median time
    after the engines over the median after stock PyTorch (1 within noise when the benchmark is
    isolated)."""
    after_stock: List[float] = []
    after_engine: List[float] = []
    for _ in range(max(1, min_reps)):
        for prev, out in [(s, after_stock) for s in stock] + [(e, after_engine) for e in engines]:
            prev()
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    a, b = _quantiles(after_stock)["ms"], _quantiles(after_engine)["ms"]
    return {"after_stock_ms": a, "after_ms": b, "ratio": b / a}


def copy_bandwidth(device: torch.device) -> float:
    """Measured device copy bandwidth in GB/s, counting bytes read plus written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.empty(n, dtype=torch.uint8, device=device).random_()
    dst = torch.empty_like(src)
    t = bench(lambda: dst.copy_(src), device, min_reps=3)
    return 2 * n / (t["ms"] * 1e-3) / 1e9


def matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Measured dense matmul throughput in TFLOP/s: 8192^3 on a GPU, 2048^3 on a CPU,
    in ``dtype`` with the current TF32 settings."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    t = bench(lambda: torch.mm(a, b), device, min_reps=3)
    return 2 * n ** 3 / (t["ms"] * 1e-3) / 1e12


def _git(*args: str) -> Optional[str]:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, timeout=10,
            cwd=os.path.dirname(os.path.abspath(__file__)), check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def fastres_commit() -> Optional[str]:
    """The checkout's commit (``+dirty`` with uncommitted changes), ``$FASTRES_COMMIT``
    where the tree is not a git checkout, else None."""
    commit = _git("rev-parse", "--short", "HEAD")
    if commit is None:
        return os.environ.get("FASTRES_COMMIT") or None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if status else "")


def _nvidia_smi() -> Optional[str]:
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit",
             "--format=csv,noheader"], capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> Dict[str, object]:
    """What every result row records about the machine and the software."""
    import fastres

    info = fastres.info()
    env = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name(),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": info["triton"],
        "fastres": info["version"],
        "fastres_commit": fastres_commit(),
        "cuda_kernels": info["cuda_kernels"],
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if device.type == "cpu":
        env.update(cpu_isa())
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        # other processes on a shared machine slow every provider; interleaved rounds keep ratios fair
        env["load_average_1min"] = round(os.getloadavg()[0], 2)
        env["cpu_count"] = os.cpu_count()
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update({
            "sm_count": props.multi_processor_count,
            "gpu_memory_gb": round(props.total_memory / 2 ** 30, 1),
            "compute_capability": f"{props.major}.{props.minor}",
            # driver, current SM clock, max SM clock, memory clock, power limit: recorded, never assumed
            "nvidia_smi": _nvidia_smi(),
            "cudnn_benchmark": torch.backends.cudnn.benchmark,
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32,
            "matmul_allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        })
    return env


# The CPU features that decide how fast a ResNet runs on it (oneDNN's bf16/fp16 kernels).
ISA_FLAGS = ("amx_bf16", "amx_fp16", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx512f", "avx2")


def cpu_isa() -> Dict[str, object]:
    """The CPU's relevant ISA (``/proc/cpuinfo`` flags of :data:`ISA_FLAGS`), PyTorch's vector
    capability, and whether oneDNN runs bf16 / fp16 natively here (else fastres computes them in fp32)."""
    from fastres import _onednn

    flags = set((_cpuinfo("flags") or "").split())
    return {
        "cpu_isa": [flag for flag in ISA_FLAGS if flag in flags],
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": _onednn.compute_dtype(torch.bfloat16) == torch.bfloat16,
        "onednn_fp16": _onednn.compute_dtype(torch.float16) == torch.float16,
    }


def _cpuinfo(field: str) -> Optional[str]:
    """The value of ``field`` in ``/proc/cpuinfo``'s first processor, or None."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor() or platform.machine()
