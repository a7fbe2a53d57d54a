"""fastres's main job: benchmark fastres against stock PyTorch, kernels and whole models.

    python -m benchmarks                      # quick run: GPU if there is one, else CPU
    python -m benchmarks --full               # every shape, model and batch size of the sweep
    python -m benchmarks --suite models train # only some suites (ops, conv, models, train, all)
    python -m benchmarks --arch resnet18 --batch 1 --image-size 64 --reps 1   # tiny
    python -m benchmarks.report DIR           # re-render report.md and the plots from DIR/results.json

Suites: ``ops`` (add_act and bn_act against eager and torch.compile), ``conv``
(conv_bn_act, also against cuDNN's fused conv with BN folded), ``models``
(eval throughput, peak memory and logits error of ResNets: torchvision eager,
compiled, CUDA-graphed; fastres per backend, compiled, CUDA-graphed),
``train`` (one optimizer step). Output: ``results.json``, ``report.md`` and
up to three PNGs in ``--out`` (default ``bench-results``).

Quick (default), GPU: every suite; ResNet-50 and ResNet-18 at batch 128 for
models and training (torch.compile rows for ResNet-50 only), kernels at batch 64
(the 8 most repeated convs of ResNet-50, the largest and smallest shape of each
elementwise variant); main dtype bf16; an estimated 4-5 minutes on an H100
(not measured yet), mostly compilation. Quick, CPU: ops, conv and models;
ResNet-50 at batch 1 and 8 in fp32 and bf16 (where oneDNN has no bf16, fastres
computes it in fp32 and torchvision's bf16 runs ATen's slower kernels), each against
torch.compile with inductor's freezing (compile time reported apart), plus the
host-overhead case (ResNet-50 at 1x3x16x16); two elementwise and two conv cases;
several minutes on 2 cores, mostly compilation.
``--full``: ResNet-18/34/50/101/152 over batches 1-256 (CPU: 1, 8, 16), every
conv and activation shape of ResNet-18 and -50 at two batch sizes, torch.compile
max-autotune too (ResNet-50 only: it takes minutes per compile).
"""
from __future__ import annotations

import argparse
import datetime
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict
from typing import List, Optional

import torch

from benchmarks import config
from benchmarks.config import ALL_SUITES, Config, compile_modes_for, default_config

def parse_args(argv=None):
    doc = __doc__.split("\n\n")
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=doc[0],
                                     epilog="\n\n".join(doc[1:]), formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the whole sweep (see below)")
    parser.add_argument("--suite", nargs="+", choices=[*ALL_SUITES, "all"],
                        help="suites to run (default: all on GPU; ops conv models on CPU quick)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                        help="main dtype (default bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--arch", nargs="+", help="models for every suite (kernels use their conv shapes)")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes for every suite")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--reps", type=int, help="timed trials per model case (median over them); "
                        "minimum timed calls per kernel case on CPU")
    parser.add_argument("--rep-ms", type=float, help="do_bench time per kernel provider (ms)")
    parser.add_argument("--providers", nargs="+", metavar="SUBSTR",
                        help="only providers whose name contains one of these (baselines are kept)")
    parser.add_argument("--no-compile", action="store_true", help="no torch.compile providers")
    parser.add_argument("--compile-modes", nargs="+", choices=["default", "max-autotune", "freezing"],
                        help="torch.compile modes of the model suite (freezing: inductor's CPU freezing, "
                        "the CPU default)")
    parser.add_argument("--no-host-overhead", action="store_true",
                        help="CPU: skip the host-overhead case (ResNet-50 at 1x3x16x16)")
    parser.add_argument("--time-limit", type=float, metavar="S",
                        help="stop starting new measurements after S seconds; what was measured is written")
    parser.add_argument("--no-cudnn-benchmark", action="store_true",
                        help="leave torch.backends.cudnn.benchmark off (default: on, for every provider)")
    parser.add_argument("--no-plots", action="store_true", help="no PNGs (python -m benchmarks.report draws them later)")
    parser.add_argument("--json-only", action="store_true",
                        help="write only results.json (python -m benchmarks.report renders report.md and the plots)")
    parser.add_argument("--out", default="bench-results", help="output folder (default bench-results)")
    return parser.parse_args(argv)


def build_config(args) -> Config:
    cfg = default_config(args.device, args.full)
    if args.suite:
        cfg.suites = list(ALL_SUITES) if "all" in args.suite else [s for s in ALL_SUITES if s in args.suite]
    if args.dtype:
        cfg.dtype = args.dtype
    if args.arch:
        cfg.model_archs = cfg.train_archs = cfg.kernel_archs = list(args.arch)
    if args.batch:
        cfg.model_batches = cfg.train_batches = cfg.kernel_batches = list(args.batch)
    cfg.image_size = args.image_size
    if args.reps:
        cfg.reps = args.reps
    if args.rep_ms:
        cfg.rep_ms = args.rep_ms
    if args.compile_modes:
        cfg.compile_modes = list(args.compile_modes)
    if args.no_compile:
        cfg.compile_modes = []
    cfg.host_overhead = not args.no_host_overhead
    cfg.providers = list(args.providers or [])
    cfg.time_limit_s = args.time_limit
    cfg.cudnn_benchmark = not args.no_cudnn_benchmark
    return cfg


class Budget:
    """``--time-limit``: no new measurement starts once it is spent."""

    def __init__(self, limit_s: Optional[float]):
        self.start, self.limit = time.monotonic(), limit_s

    def exhausted(self) -> bool:
        return self.limit is not None and time.monotonic() - self.start > self.limit


def _keep(name: str, cfg: Config, baseline: bool = False) -> bool:
    return baseline or not cfg.providers or any(s in name for s in cfg.providers)


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # to a log file (not a terminal): fewer updates
    return tqdm(total=total, desc=desc, unit="run", dynamic_ncols=True, file=sys.stderr,
                mininterval=0.1 if sys.stderr.isatty() else 5.0)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def run_suite(suite: str, cfg: Config, device: torch.device, peaks: dict, budget: Budget, skipped: List[dict]):
    from benchmarks import bench_kernels, bench_models, cases

    dtype = getattr(torch, cfg.dtype)
    if suite in ("ops", "conv"):
        compile_ok = any(m != "freezing" for m in cfg.compile_modes)  # freezing is a model-suite mode
        keep = (lambda name: _keep(name, cfg)) if cfg.providers else None
        kcs = config.kernel_cases(cfg, suite)
        total = sum(len([n for n in cases.provider_names(c, device, compile=compile_ok)
                         if keep is None or n == "eager" or keep(n)]) for c in kcs)
        bar = _progress(total, suite)
        try:
            rows = bench_kernels.run(kcs, device, dtype, peaks, compile=compile_ok, rep_ms=cfg.rep_ms,
                                     min_reps=min(cfg.reps, 5), progress=bar, budget=budget, skipped=skipped,
                                     keep=keep)
        finally:
            if bar is not None:
                bar.close()
        return rows
    trials = cfg.reps
    if suite == "models":
        def providers_for(arch, batch):
            modes = compile_modes_for(cfg, arch, batch) if cfg.compile_modes else []
            provs = bench_models.eval_providers(device, dtype, compile_modes=modes, full=cfg.full)
            return [p for p in provs if _keep(p.name, cfg, p.name == "tv-eager")]

        host = cfg.host_overhead and device.type == "cpu"
        total = sum(len(providers_for(a, b)) for a in cfg.model_archs for b in cfg.model_batches)
        total += len(bench_models.host_overhead_providers(device)) if host else 0
        bar = _progress(total, "models")
        try:
            rows = bench_models.run_eval(cfg.model_archs, cfg.model_batches, device, providers_for,
                                         image_size=cfg.image_size, trials=trials, trial_ms=cfg.trial_ms,
                                         progress=bar, budget=budget, skipped=skipped)
            if host:  # ResNet-50 at 1x3x16x16: the per-layer host cost, with negligible arithmetic
                rows += bench_models.run_eval(["resnet50"], [1], device,
                                              lambda a, b: bench_models.host_overhead_providers(device),
                                              image_size=16, trials=max(trials, 20), trial_ms=cfg.trial_ms,
                                              progress=bar, budget=budget, skipped=skipped)
            return rows
        finally:
            if bar is not None:
                bar.close()
    provs = [p for p in bench_models.train_providers(device, dtype) if _keep(p.name, cfg, p.name == "tv-eager")
             and (cfg.compile_modes or p.compile_mode is None)]
    bar = _progress(len(provs) * len(cfg.train_archs) * len(cfg.train_batches), "train")
    try:
        return bench_models.run_train(cfg.train_archs, cfg.train_batches, device, provs, image_size=cfg.image_size,
                                      trials=trials, trial_ms=cfg.trial_ms, progress=bar, budget=budget,
                                      skipped=skipped)
    finally:
        if bar is not None:
            bar.close()


def main(argv=None) -> int:
    args = parse_args(argv)
    cfg = build_config(args)
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("benchmarks: --device cuda but no GPU is visible", file=sys.stderr)
        return 2
    cudnn_benchmark = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark and device.type == "cuda"
    try:
        return _main(args, cfg, device, list(argv) if argv is not None else sys.argv[1:])
    finally:
        torch.backends.cudnn.benchmark = cudnn_benchmark


def _main(args, cfg: Config, device: torch.device, argv_list: List[str]) -> int:
    from benchmarks import report
    from benchmarks.timing import copy_bandwidth, environment, matmul_tflops

    budget = Budget(cfg.time_limit_s)
    result = {
        "schema": report.SCHEMA,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks" + "".join(" " + shlex.quote(a) for a in argv_list),
        "environment": environment(device),
        "config": {k: v for k, v in asdict(cfg).items() if v not in (None, [])},
        "peaks": {},
        "rows": [],
        "skipped": [],
        "interrupted": None,
        "suite_seconds": {},
    }
    env = result["environment"]
    row_env = {k: env.get(k) for k in report.ROW_ENV_KEYS}
    print(f"{env['device']} ({device.type}) | torch {env['torch']} CUDA {env['cuda']} triton {env['triton']} | "
          f"fastres {env['fastres']} {env['fastres_commit']} | suites {' '.join(cfg.suites)} | "
          f"{'full' if cfg.full else 'quick'}", flush=True)
    old_term = signal.signal(signal.SIGTERM, _interrupt)
    t_start = time.monotonic()
    try:
        dtype = getattr(torch, cfg.dtype)
        result["peaks"] = {"copy_gbps": copy_bandwidth(device), "matmul_tflops": matmul_tflops(device, dtype),
                           "matmul_dtype": cfg.dtype,
                           "matmul_shape": "8192^3" if device.type == "cuda" else "2048^3"}
        print(f"measured peaks: copy {result['peaks']['copy_gbps']:.0f} GB/s, "
              f"matmul {result['peaks']['matmul_tflops']:.2f} TFLOP/s ({cfg.dtype})", flush=True)
        # The main job first: if a time limit or a signal stops the run, the model numbers exist.
        for suite in sorted(cfg.suites, key=["models", "train", "conv", "ops"].index):
            t_suite = time.monotonic()
            rows = run_suite(suite, cfg, device, result["peaks"], budget, result["skipped"])
            result["rows"] += [{**row_env, **r} for r in rows]
            result["suite_seconds"][suite] = round(time.monotonic() - t_suite, 1)
            result["elapsed_s"] = time.monotonic() - t_start
            report.write_outputs(result, args.out, plots=False, markdown=not args.json_only)  # survives a kill
    except KeyboardInterrupt as e:
        result["interrupted"] = str(e) or "KeyboardInterrupt"
        print(f"\ninterrupted ({result['interrupted']}): writing what was measured", file=sys.stderr)
    finally:
        signal.signal(signal.SIGTERM, old_term)
    result["elapsed_s"] = time.monotonic() - t_start
    written = report.write_outputs(result, args.out, plots=not (args.no_plots or args.json_only),
                                   markdown=not args.json_only)
    print(report.text_tables(result))
    if result["skipped"]:
        print(f"\n{len(result['skipped'])} measurement(s) not made; reasons in report.md")
    print(f"\n{result['elapsed_s']:.0f} s; wrote " + ", ".join(written))
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    code = main()
    if code == 130:
        # Interrupted (SIGTERM from `timeout`, Ctrl-C) with the results written: exit now rather
        # than wait for compile worker processes or threads that may not stop on their own.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
