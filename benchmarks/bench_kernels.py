"""The kernel suites (``ops``: add_act and bn_act; ``conv``: conv_bn_act).

For each case (``benchmarks/cases.py``) every provider is built, called once
(``torch.compile`` compiles and Triton autotunes here, outside the timed
region; the output is compared with the eager one), then timed in this
process: on a GPU one after the other with :func:`benchmarks.timing.bench`
(``do_bench``, L2 flushed), on a CPU in interleaved rounds
(:func:`benchmarks.timing.bench_interleaved`). Each row gives the
median time with p20/p80, the achieved GB/s (least traffic the op needs) and,
for convolutions, TFLOP/s, each as a fraction of the peaks measured in the same
run, the speedup over eager and over the fastest stock PyTorch provider, and
the output's max relative difference from eager.
"""
from __future__ import annotations

import gc
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch

from benchmarks import cases as kcases
from benchmarks.timing import bench, bench_interleaved, synchronize
from fastres import tune


def _rel_diff(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max|y - ref| / max|ref| in fp32."""
    y, ref = y.float(), ref.float()
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _reset_compiler() -> None:
    # A fresh dynamo cache per case: without it the per-shape recompiles of the
    # same function hit the recompile limit and silently fall back to eager.
    torch._dynamo.reset()


def run(cases: Sequence[kcases.KernelCase], device: torch.device, dtype: torch.dtype, peaks: Dict[str, float], *,
        compile: bool = True, rep_ms: float = 100, min_reps: int = 5, progress=None, budget=None,
        skipped: Optional[List[dict]] = None, keep: Optional[Callable[[str], bool]] = None) -> List[dict]:
    """Rows for every (case, provider); ``keep(name)`` filters providers (eager always runs:
    it is the reference of the others)."""
    rows: List[dict] = []
    dname = str(dtype).replace("torch.", "")
    for case in cases:
        names = [n for n in kcases.provider_names(case, device, compile=compile)
                 if keep is None or n == "eager" or keep(n)]
        if budget is not None and budget.exhausted():
            if skipped is not None:
                skipped += [{"suite": case.suite, "case": case.label, "batch": case.batch, "provider": p,
                             "reason": "time limit reached"} for p in names]
            if progress is not None:
                progress.update(len(names))
            continue
        if progress is not None:
            progress.set_postfix_str(f"N={case.batch} {case.label}", refresh=False)
        if compile:
            _reset_compiler()
        case_rows = []
        meta = {"suite": case.suite, "op": case.op, "case": case.label, "source": case.source,
                "shape": list(case.shape), "out_shape": list(case.out_shape), "residual": case.residual,
                "activation": case.activation, "dtype": dname, "layout": "channels_last", "batch": case.batch}

        def failed(name, e):
            reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"[:300]
            if skipped is not None:
                skipped.append({"suite": case.suite, "case": case.label, "batch": case.batch, "provider": name,
                                "reason": reason})
            if device.type == "cuda":
                torch.cuda.empty_cache()

        with torch.no_grad():
            fns = {n: v for n, v in kcases.providers(case, device, dtype, compile=compile).items() if n in names}
            # 1. A first call of each (compilation, autotuning, first-use work), outside any timing;
            #    the output is compared with eager's (eager comes first).
            ready, ref = {}, None
            for name, (fn, backend) in fns.items():
                try:
                    tune.used(reset=True)
                    t0 = time.perf_counter()
                    y = fn()
                    synchronize(device)
                    first_s = time.perf_counter() - t0
                    if backend == "auto":  # the backend fastres.tune chose for this shape
                        backend = "auto:" + ",".join(sorted({e["choice"] for e in tune.used().values()}))
                    if ref is None:
                        ref = y.detach().clone()
                    ready[name] = (fn, backend, first_s, _rel_diff(y, ref))
                    del y
                except Exception as e:  # noqa: BLE001 - one provider failing must not stop the run
                    failed(name, e)
                    if progress is not None:
                        progress.update(1)
            # 2. Timing: GPU, do_bench per provider; CPU, interleaved rounds (fair under shared load).
            timings = {}
            if device.type == "cuda":
                for name, (fn, *_rest) in ready.items():
                    try:
                        timings[name] = bench(fn, device, rep_ms=rep_ms, min_reps=min_reps)
                    except Exception as e:  # noqa: BLE001
                        failed(name, e)
                        if progress is not None:
                            progress.update(1)
            elif ready:
                timings = bench_interleaved({n: v[0] for n, v in ready.items()}, warmup=1, min_reps=min_reps,
                                            rep_ms=rep_ms)
            for name, t in timings.items():
                fn, backend, first_s, diff = ready[name]
                gbps = case.min_bytes(dtype) / (t["ms"] * 1e-3) / 1e9
                row = {**meta, "provider": name, "backend": backend, **t, "first_call_s": first_s, "gbps": gbps,
                       "frac_copy_bw": gbps / peaks["copy_gbps"] if peaks.get("copy_gbps") else None,
                       "rel_diff_vs_eager": diff}
                if case.flops:
                    tflops = case.flops / (t["ms"] * 1e-3) / 1e12
                    row.update({"gflop": case.flops / 1e9, "tflops": tflops,
                                "frac_peak_flops": tflops / peaks["matmul_tflops"] if peaks.get("matmul_tflops")
                                else None})
                case_rows.append(row)
                if progress is not None:
                    progress.update(1)
        del fns, ready, ref
        _add_speedups(case_rows)
        rows += case_rows
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _add_speedups(rows: List[dict]) -> None:
    """``speedup_vs_eager`` and ``speedup_vs_best_stock`` (the fastest of eager,
    compile and cuDNN-fused/folded) for every row of one case."""
    eager = next((r["ms"] for r in rows if r["provider"] == "eager"), None)
    stock = [r["ms"] for r in rows if r["provider"] in kcases.STOCK_PROVIDERS]
    best = min(stock) if stock else None
    for r in rows:
        r["speedup_vs_eager"] = eager / r["ms"] if eager else None
        r["speedup_vs_best_stock"] = best / r["ms"] if best else None
