"""Fused conv-BN-activation on every distinct conv of a ResNet: check, then benchmark.

    python -m benchmarks.gpu_conv                       # check at batch 32, bench at 64 and 256
    python -m benchmarks.gpu_conv --check-only          # correctness only (exit 1 on a failure)
    python -m benchmarks.gpu_conv --bench-only --batches 64 --out conv.json
    python -m benchmarks.gpu_conv --backend cuda        # one backend (default auto: backend=None, per-shape choice)

Needs a CUDA GPU. Everything is bf16 channels_last (``--dtype`` to change).

1. Check: ``fastres.ops.conv_bn_act(backend=...)`` against the reference on
   the same inputs upcast to fp32 (TF32 off), cast once; relative error
   ``max|y - ref| / max|ref|`` per shape, pass/fail, exit status 1 on failure;
   then one conv with more than 2**31 output elements (int64 addressing).
2. Bench (``triton.testing.do_bench``: median, p20, p80; L2 flushed) per shape:
   * ``eager``: ``relu(bn(conv(x)) (+ r))``, an ``nn.Conv2d`` and an eval
     ``nn.BatchNorm2d`` with fp32 parameters (the stock PyTorch model);
   * ``cudnn``: cuDNN's fused ``torch.cudnn_convolution_relu`` /
     ``torch.cudnn_convolution_add_relu`` with BN folded into the weight and a
     bias in fp32, then cast (what a deployment would fold); the downsample
     convs (no activation) use ``F.conv2d`` with the folded bias;
   * ``fastres``: ``fastres.ops.conv_bn_act(backend=...)``, autotuned before timing; with
     ``--backend auto`` the ``backend`` column says which backend fastres.tune chose,
     and ``cuda kernel`` which CUTLASS kernel the ``cuda`` backend runs the shape
     with on this GPU (sm90 or sm80 tile, or why it does not).
   Reports times, speedups, achieved TFLOP/s, the geometric-mean speedups and
   the whole network's conv time (each shape times its count).
"""
from __future__ import annotations

import argparse
import json
import math
import shlex
import sys
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `fastres` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F

from benchmarks import cases
from fastres import _extension, backends, tune

# Columns of this script's output, and the benchmarks.cases provider each one is.
PROVIDERS = {"eager": "eager", "cudnn": "cudnn-fused", "fastres": "fastres-{backend}"}


def _fused(case, backend, x, weight, scale, shift, r):
    from fastres import ops

    c = case.conv
    return ops.conv_bn_act(x, weight, scale, shift, r, stride=c.stride, padding=c.padding, dilation=c.dilation,
                           groups=c.groups, activation=case.activation, backend=None if backend == "auto" else backend)


def providers(shape, backend, dtype, device) -> Dict[str, object]:
    """``{"eager", "cudnn", "fastres"}`` -> fn, from the kernel benchmark's cases (``benchmarks/cases.py``)."""
    fns = cases.providers(cases.conv_case(shape), device, dtype, compile=False)
    want = {col: name.format(backend=backend) for col, name in PROVIDERS.items()}
    if want["fastres"] not in fns:
        raise SystemExit(f"gpu_conv: backend {backend!r} cannot run conv_bn_act here")
    return {col: fns[name][0] for col, name in want.items()}


def check(shapes, backend, dtype, device, tol: float) -> List[dict]:
    """Relative error of the fused op against the fp32 reference, per shape."""
    from fastres import reference

    rows = []
    tf32 = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = False  # an exact fp32 reference
    try:
        for shape in _progress(shapes, "check"):
            case = cases.conv_case(shape)
            x, weight, scale, shift, r = cases.conv_inputs(case, device, dtype)
            with torch.no_grad():
                y = _fused(case, backend, x, weight, scale, shift, r)
                up = lambda t: None if t is None else t.float()  # noqa: E731
                ref = reference.conv_bn_act(
                    up(x), up(weight), scale, shift, up(r), [shape.stride] * 2, [shape.padding] * 2,
                    [shape.dilation] * 2, shape.groups, case.activation,
                ).to(dtype)
            err = ((y.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-6)).item()
            ok = math.isfinite(err) and err <= tol and y.stride() == ref.stride()
            rows.append({"shape": shape.label, "name": shape.name, "batch": shape.N, "rel_err": err, "ok": ok})
            print(f"  {'PASS' if ok else 'FAIL'}  {shape.label:<36} rel err {err:.2e}", flush=True)
            del x, weight, r, y, ref
    finally:
        torch.backends.cudnn.allow_tf32 = tf32
    return rows


def check_int64(backend, dtype, device, tol: float, batch: int = 2800) -> dict:
    """One conv whose output and residual exceed 2**31 elements (int64 addressing):
    ResNet-50's layer1 1x1 64->256 with a residual at 56x56, N=2800 (about 20 GB at
    peak in bf16); the first and last two images are compared with the reference."""
    from fastres.shapes import ConvShape

    shape = ConvShape(batch, 64, 56, 56, 256, 1, 1, 1, 0, 1, 1, True, name="int64-check")
    case = cases.conv_case(shape)
    x, weight, scale, shift, r = cases.conv_inputs(case, device, dtype)
    with torch.no_grad():
        y = _fused(case, backend, x, weight, scale, shift, r)
        errs = []
        for sl in (slice(0, 2), slice(batch - 2, batch)):
            ref = torch.relu(F.conv2d(x[sl].float(), weight.float()) * scale.view(1, -1, 1, 1)
                             + shift.view(1, -1, 1, 1) + r[sl].float()).to(dtype)
            errs.append(((y[sl].float() - ref.float()).abs().max() / ref.float().abs().max()).item())
    err = max(errs)
    ok = math.isfinite(err) and err <= tol
    print(f"  {'PASS' if ok else 'FAIL'}  {'int64: ' + shape.label + f' N={batch}':<36} rel err {err:.2e}", flush=True)
    del x, r, y
    torch.cuda.empty_cache()
    return {"shape": shape.label, "name": shape.name, "batch": batch, "elements": shape.N * shape.K * 56 * 56,
            "rel_err": err, "ok": ok}


def bench(shapes, backend, dtype, device, rep_ms: int) -> List[dict]:
    from benchmarks.timing import bench as time_fn

    rows = []
    for shape in _progress(shapes, f"bench N={shapes[0].N}"):
        with torch.no_grad():
            fns = providers(shape, backend, dtype, device)
            tune.used(reset=True)
            fns["fastres"]()  # autotune (and, for auto, the per-shape choice) outside the timed region
            if device.type == "cuda":
                torch.cuda.synchronize()
            chosen = tune.used()
            t = {p: time_fn(fns[p], device, rep_ms=rep_ms) for p in PROVIDERS}
        row = {"shape": shape.label, "name": shape.name, "batch": shape.N, "count": shape.count,
               "activation": cases.conv_case(shape).activation, "gflop": shape.flops / 1e9,
               "backend": ",".join(sorted({e["choice"] for e in chosen.values()})) or backend,
               "cuda_kernel": _extension.cuda_conv_kernel(
                   dtype, shape.N, shape.C, shape.H, shape.W, shape.K, shape.R, shape.S, (shape.stride,) * 2,
                   (shape.padding,) * 2, (shape.dilation,) * 2, shape.groups, device),
               "candidates_ms": {k: e.get("ms") for k, e in chosen.items()}}
        for p in PROVIDERS:
            row.update({f"{p}_ms": t[p]["ms"], f"{p}_ms_p20": t[p]["ms_p20"], f"{p}_ms_p80": t[p]["ms_p80"],
                        f"{p}_tflops": shape.flops / (t[p]["ms"] * 1e-3) / 1e12})
        row["speedup_vs_eager"] = t["eager"]["ms"] / t["fastres"]["ms"]
        row["speedup_vs_cudnn"] = t["cudnn"]["ms"] / t["fastres"]["ms"]
        rows.append(row)
        del fns
        torch.cuda.empty_cache()
    return rows


def summarize(rows: List[dict]) -> dict:
    """Geometric-mean speedups and the network's total conv time (shape time x count)."""
    def geo(key):
        return math.exp(sum(math.log(r[key]) for r in rows) / len(rows))

    total = {p: sum(r[f"{p}_ms"] * r["count"] for r in rows) for p in PROVIDERS}
    return {"batch": rows[0]["batch"], "geomean_speedup_vs_eager": geo("speedup_vs_eager"),
            "geomean_speedup_vs_cudnn": geo("speedup_vs_cudnn"),
            **{f"network_{p}_ms": v for p, v in total.items()},
            "network_speedup_vs_eager": total["eager"] / total["fastres"],
            "network_speedup_vs_cudnn": total["cudnn"] / total["fastres"]}


def table(rows: List[dict]) -> str:
    cols = [("shape", "shape", "{}"), ("count", "n", "{}"), ("backend", "backend", "{}"),
            ("cuda_kernel", "cuda kernel", "{}"),
            ("eager_ms", "eager ms", "{:.4f}"),
            ("cudnn_ms", "cudnn ms", "{:.4f}"), ("fastres_ms", "fastres ms", "{:.4f}"),
            ("fastres_ms_p20", "p20", "{:.4f}"), ("fastres_ms_p80", "p80", "{:.4f}"),
            ("fastres_tflops", "TFLOP/s", "{:.1f}"), ("cudnn_tflops", "cudnn TFLOP/s", "{:.1f}"),
            ("speedup_vs_eager", "vs eager", "{:.2f}x"), ("speedup_vs_cudnn", "vs cudnn", "{:.2f}x")]
    body = [[fmt.format(r[k]) for k, _, fmt in cols] for r in rows]
    head = [title for _, title, _ in cols]
    widths = [max(len(c) for c in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def _progress(items, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, unit="shape", leave=False)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_conv", description=__doc__.splitlines()[0])
    gpu_backends = [n for n in backends.implemented_backends("conv_bn_act") if n != "torch"]
    parser.add_argument("--backend", choices=["auto", *gpu_backends], default="auto",
                        help="fastres backend to test (auto: backend=None, the per-shape choice of fastres.tune)")
    parser.add_argument("--arch", default="resnet50", help="torchvision model whose convs are used")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="benchmark batch sizes")
    parser.add_argument("--check-batch", type=int, default=32, help="batch size of the correctness check")
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--tol", type=float, default=2e-2,
                        help="max of max|y - ref| / max|ref| (one bf16 rounding flip is up to 7.8e-3)")
    parser.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition time per provider")
    parser.add_argument("--check-only", action="store_true", help="only the correctness check")
    parser.add_argument("--skip-int64", action="store_true",
                        help="skip the check of a conv with more than 2**31 output elements (~20 GB)")
    parser.add_argument("--bench-only", action="store_true", help="only the benchmark")
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.check_only and args.bench_only:
        parser.error("--check-only and --bench-only exclude each other")
    if not torch.cuda.is_available():
        print("gpu_conv: needs a CUDA GPU", file=sys.stderr)
        return 2

    from benchmarks.timing import environment
    from fastres.shapes import conv_shapes

    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    env = environment(device)
    print(f"device: {env['device']}  torch {env['torch']}  triton {env['triton']}  backend {args.backend}  "
          f"{args.arch} {args.dtype} channels_last")
    command = "python -m benchmarks.gpu_conv " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    result = {"env": env, "command": command, "backend": args.backend, "arch": args.arch, "dtype": args.dtype}
    failed = False
    if not args.bench_only:
        print(f"check at batch {args.check_batch} (tolerance {args.tol:g}):")
        tf32 = torch.backends.cudnn.allow_tf32
        result["check"] = check(conv_shapes(args.arch, args.check_batch), args.backend, dtype, device, args.tol)
        if not args.skip_int64:
            torch.backends.cudnn.allow_tf32 = False
            try:
                result["check"].append(check_int64(args.backend, dtype, device, args.tol))
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
        failed = not all(r["ok"] for r in result["check"])
        print(f"check: {sum(r['ok'] for r in result['check'])}/{len(result['check'])} shapes pass")
    if not args.check_only:
        result["bench"], result["summary"] = [], []
        for batch in args.batches:
            rows = bench(conv_shapes(args.arch, batch), args.backend, dtype, device, args.rep_ms)
            summary = summarize(rows)
            result["bench"] += rows
            result["summary"].append(summary)
            print(f"\nbatch {batch}:\n{table(rows)}")
            print(f"geomean speedup: {summary['geomean_speedup_vs_eager']:.2f}x vs eager, "
                  f"{summary['geomean_speedup_vs_cudnn']:.2f}x vs cudnn; whole-network conv time "
                  f"{summary['network_fastres_ms']:.2f} ms ({summary['network_speedup_vs_eager']:.2f}x vs eager, "
                  f"{summary['network_speedup_vs_cudnn']:.2f}x vs cudnn)")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
