"""Compiles the Triton conv kernel ahead of time for a CUDA GPU, with no GPU.

The tests run ``fastres/triton/conv.py`` under the Triton interpreter, which
accepts things the real compiler rejects (``tl.dot`` operands under 16,
mismatched dtypes, shared memory over the limit, ...) and says nothing about
registers. This script compiles ``_conv_bn_act_kernel`` with Triton's real
compiler and ptxas for sm_90 (``--arch``), specialized exactly as the JIT would
specialize it for each call (argument types, constexprs, integers equal to 1,
16-divisibility), and checks each compiled kernel:

* it compiles;
* its shared memory (``metadata.shared``) is within the pruner's estimate
  (``conv.smem_bytes``) and the device limit;
* the reduction runs on tensor cores where it should (``wgmma`` on sm_90 with
  4 or more warps, ``mma.sync`` otherwise; fp64 on DMMA ``mma.sync``); exact
  fp32 (``ieee``) runs on FMA units, as it must;
* registers and spills, from ptxas's log: ``--quick`` fails above 64 bytes of
  spill stores (a few bytes come and go between ptxas versions), ``--full``
  reports them (``--max-spill`` sets the bound of either).

    python scripts/triton_compile_check.py              # --quick: 7 representative kernels, ~10 s
    python scripts/triton_compile_check.py --full -j 2  # every config x specialization family of
                                                        # the ResNet family: ~1600 kernels, ~7 min on 2 cores

``--full`` takes the distinct convs of resnet18/50, resnext50/101, wide_resnet50
and a dilated resnet50 (``fastres.shapes``, needs torchvision) at batch 1, 8,
32 and 256, in fp16, bf16, fp32 (TF32 and exact), fp64, NCHW and NHWC, with and
without residual, each activation; keeps the configs the pruner keeps, and
compiles one kernel per (dtype, config, FLAT_K, IS_1X1, residual, activation,
output format) family, the first call met of each (members differ only in
geometry constexprs and 16-divisibility: about 15000 distinct kernels in all).
Exit status: 0 all checks pass, 1 a check failed, 77 this Triton cannot compile
for CUDA here (no ``nvidia`` backend or ptxas).
"""
import argparse
import atexit
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Tuple

# Before triton is imported: the real compiler (and conv.py's GPU configs), the
# ptxas log (registers, spills) on stdout, no cache hits (they skip ptxas) in a
# cache of our own.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
_CACHE = tempfile.mkdtemp(prefix="fastres-triton-aot-")
os.environ["TRITON_CACHE_DIR"] = _CACHE
atexit.register(shutil.rmtree, _CACHE, True)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

SKIP = 77
SMEM_LIMIT = {80: 166912, 86: 101376, 87: 166912, 89: 101376, 90: 232448}  # opt-in bytes per block
DTYPES = {  # name: (torch dtype, cudnn.allow_tf32)
    "fp16": (torch.float16, True), "bf16": (torch.bfloat16, True), "tf32": (torch.float32, True),
    "ieee": (torch.float32, False), "fp64": (torch.float64, True),
}
_TL_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


@dataclass(frozen=True)
class Spec:
    """One kernel to compile: a conv (input n, c, h, w; weight k, c/groups, r, s), the
    call's dtype / memory format / residual / activation, and a tile config (an index
    into ``conv.GPU_CONFIGS``)."""

    geom: Tuple[int, ...]  # n, c, h, w, k, r, s, stride, padding, dilation, groups
    dtype: str
    fmt: str
    residual: bool
    act: str
    config: int
    name: str = ""

    def family(self, flat: bool, is_1x1: bool):
        return (self.dtype, self.config, flat, is_1x1, self.residual, self.act, self.fmt)


# --quick: a kernel of each kind, each with a config the pruner keeps for it and
# that does not spill (the NCHW one spilled 1.6 KB before its epilogue was
# transposed): (name, geometry, dtype, fmt, residual, act, config indices: the
# first the pruner keeps under this triton; the NCHW tile is smaller before 3.8).
QUICK = [
    ("3x3 tiled, 128x256 wgmma", (8, 256, 14, 14, 256, 3, 3, 1, 1, 1, 1), "fp16", "nhwc", False, "relu", 0),
    ("1x1 NCHW out + residual", (8, 256, 14, 14, 1024, 1, 1, 1, 0, 1, 1), "bf16", "nchw", True, "silu", (4, 8)),
    ("stem 7x7/2 C=3 flat, TF32", (8, 3, 64, 64, 64, 7, 7, 2, 3, 1, 1), "tf32", "nhwc", True, "relu", 8),
    ("3x3 exact fp32, FMA", (8, 64, 28, 28, 64, 3, 3, 1, 1, 1, 1), "ieee", "nchw", False, "relu", 7),
    ("1x1 s2 + residual, fp64 DMMA", (4, 64, 14, 14, 128, 1, 1, 2, 0, 1, 1), "fp64", "nhwc", True, "silu", 9),
    ("resnext g32, 2 warps mma.sync", (8, 128, 14, 14, 128, 3, 3, 1, 1, 1, 32), "fp16", "nchw", True, "identity", 12),
    ("1x1 C=8 flat", (8, 8, 28, 28, 64, 1, 1, 1, 0, 1, 1), "fp16", "nhwc", False, "relu", 13),
]

FULL_NETS = [
    ("resnet18", {}), ("resnet50", {}), ("resnext50_32x4d", {}), ("resnext101_32x8d", {}),
    ("wide_resnet50_2", {}), ("resnet50", {"replace_stride_with_dilation": [False, True, True]}),
]
FULL_BATCHES = (1, 8, 32, 256)


def _imports():
    """conv and the Triton compiler pieces, or an exit with status SKIP saying why not."""
    try:
        import triton
        from triton.backends import backends
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:
        print(f"SKIP: cannot import triton's compiler: {e}")
        sys.exit(SKIP)
    if "nvidia" not in backends:
        print(f"SKIP: this triton has no nvidia backend ({sorted(backends)})")
        sys.exit(SKIP)
    import inspect

    params = inspect.signature(ASTSource).parameters
    if not {"constexprs", "attrs"} <= set(params):  # triton 3.1's ASTSource(fn, signature, constants, attrs)
        print(f"SKIP: triton {triton.__version__}'s ASTSource takes {list(params)}, not the "
              "(fn, signature, constexprs, attrs) of the tested tritons (3.6, 3.8)")
        sys.exit(SKIP)
    from fastres.triton import conv

    assert not conv.INTERPRET and conv.CONFIGS is conv.GPU_CONFIGS
    return triton, GPUTarget, ASTSource, conv


triton, GPUTarget, ASTSource, conv = _imports()


def _check_ptxas(arch: int) -> None:
    """Exit with status SKIP if triton's nvidia backend has no working ptxas for ``arch``."""
    try:
        from triton.backends.nvidia import compiler as nvidia

        try:
            nvidia.get_ptxas_version(arch)
        except TypeError:  # older triton: no arch argument
            nvidia.get_ptxas_version()
    except Exception as e:  # noqa: BLE001 -- any failure to run ptxas means: cannot compile here
        print(f"SKIP: no working ptxas for triton's nvidia backend: {type(e).__name__}: {e}")
        sys.exit(SKIP)
KERNEL = conv._conv_bn_act_kernel  # Autotuner -> Heuristics -> JITFunction
JIT = KERNEL.fn.fn


def kernel_args(spec: Spec) -> Dict:
    """The kernel's arguments for ``spec`` as the launcher passes them (``conv._prepare``
    on meta tensors), with the config's meta-parameters and the heuristics' values."""
    n, c, h, w, k, r, s, stride, pad, dil, groups = spec.geom
    dtype, tf32 = DTYPES[spec.dtype]
    mf = torch.channels_last if spec.fmt == "nhwc" else torch.contiguous_format
    x = torch.empty(n, c, h, w, dtype=dtype, device="meta").contiguous(memory_format=mf)
    wt = torch.empty(k, c // groups, r, s, dtype=dtype, device="meta").contiguous(memory_format=mf)
    scale = torch.empty(k, device="meta")
    shift = torch.empty(k, device="meta")
    res = None
    if spec.residual:
        p, q = ((hw + 2 * pad - dil * (rs - 1) - 1) // stride + 1 for hw, rs in ((h, r), (w, s)))
        res = torch.empty(n, k, p, q, dtype=dtype, device="meta").contiguous(memory_format=mf)
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        _, args = conv._prepare(x, wt, scale, shift, res, [stride] * 2, [pad] * 2, [dil] * 2, groups, spec.act)
    finally:
        torch.backends.cudnn.allow_tf32 = saved
    cfg = conv.GPU_CONFIGS[spec.config]
    args.update(cfg.kwargs)
    for name, fn in KERNEL.fn.values.items():  # the heuristics (FLAT_K)
        args[name] = fn(args)
    return args


def specialize(args: Dict) -> Tuple[Dict, Dict, Dict]:
    """(signature, constexprs, attrs) for ``ASTSource``, as the JIT specializes a call:
    constexpr parameters and None by value, tensors as pointers to their dtype,
    integers as i32/i64 except 1 (a constexpr), 16-divisible integers and
    16-aligned pointers with ``tt.divisibility`` 16 (meta tensors count as aligned)."""
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(JIT.params):
        v = args[p.name]
        if p.is_constexpr or v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1):
            signature[p.name] = "constexpr"
            constexprs[p.name] = v
            attrs[(i,)] = []
            continue
        if isinstance(v, torch.Tensor):
            signature[p.name] = "*" + _TL_TYPES[v.dtype]
            divisible = v.data_ptr() % 16 == 0
        elif isinstance(v, bool):
            signature[p.name] = "i1"
            divisible = False
        elif isinstance(v, int):
            signature[p.name] = "i32" if -2**31 <= v < 2**31 else "i64"
            divisible = v % 16 == 0
        else:
            raise TypeError(f"{p.name}: unexpected argument {v!r}")
        attrs[(i,)] = [["tt.divisibility", 16]] if divisible else []
    return signature, constexprs, attrs


def expected_units(dtype: str, num_warps: int, arch: int) -> str:
    """Which units the tiled reduction must run on: "wgmma", "mma" or "fma"."""
    if dtype == "ieee":
        return "fma"
    if dtype == "fp64":
        return "mma" if arch >= 80 else "fma"
    if arch >= 90 and num_warps % 4 == 0:
        return "wgmma"
    return "mma" if arch >= 80 else "fma"


def _num(pattern: str, text: str) -> Optional[int]:
    m = re.search(pattern, text)
    return int(m.group(1)) if m else None


def compile_one(job) -> Dict:
    """Compile one kernel (``job``: spec as a dict, signature, constexprs, attrs, arch);
    the measurements and the checks' verdict."""
    spec, signature, constexprs, attrs, arch = job
    spec = Spec(**spec)
    cfg = conv.GPU_CONFIGS[spec.config]
    row = dict(spec=asdict(spec), flat=constexprs["FLAT_K"], is_1x1=constexprs["IS_1X1"])
    log = io.StringIO()
    t0 = time.time()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(
                ASTSource(fn=JIT, signature=signature, constexprs=constexprs, attrs=attrs),
                target=GPUTarget("cuda", arch, 32),
                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages},
            )
    except Exception as e:  # noqa: BLE001 -- a compile error is a result here
        row.update(error=f"{type(e).__name__}: {e}"[-4000:], failures=["compile error"])
        return row
    ptx, text = kernel.asm["ptx"], log.getvalue()
    wgmma = len(re.findall(r"\bwgmma\.mma_async", ptx))
    mma = len(re.findall(r"\bmma\.sync\.aligned", ptx))
    elem = torch.empty((), dtype=DTYPES[spec.dtype][0]).element_size()
    row.update(
        secs=round(time.time() - t0, 1),
        shared=kernel.metadata.shared,
        smem_estimate=conv.smem_bytes(cfg, elem, spec.fmt == "nhwc"),
        regs=_num(r"Used (\d+) registers", text),
        spill_stores=_num(r"(\d+) bytes spill stores", text),
        spill_loads=_num(r"(\d+) bytes spill loads", text),
        units="wgmma" if wgmma else "mma" if mma else "fma",
        vector_stores=len(re.findall(r"st\.global[^\n]*\.v[248]", ptx)),
        stores=len(re.findall(r"st\.global", ptx)),
    )
    failures = []
    if row["shared"] > row["smem_estimate"]:
        failures.append(f"shared {row['shared']} > the pruner's estimate {row['smem_estimate']}")
    if row["shared"] > SMEM_LIMIT.get(arch, SMEM_LIMIT[90]):
        failures.append(f"shared {row['shared']} > the sm_{arch} limit")
    want = expected_units(spec.dtype, cfg.num_warps, arch)
    if row["units"] != want:
        failures.append(f"reduction on {row['units']}, expected {want}")
    row["failures"] = failures
    return row


def quick_specs() -> List[Spec]:
    specs = []
    for name, geom, dt, fmt, res, act, configs in QUICK:
        configs = configs if isinstance(configs, tuple) else (configs,)
        for ci in configs:  # the first the pruner keeps (the last, to fail on, if none)
            spec = Spec(geom, dt, fmt, res, act, ci, name)
            if conv.GPU_CONFIGS[ci] in conv.prune_configs(conv.GPU_CONFIGS, kernel_args(spec)):
                break
        specs.append(spec)
    return specs


def full_specs() -> List[Spec]:
    """One spec per family, from the ResNet family's convs and every call option."""
    from fastres.shapes import conv_shapes

    geoms = {}
    for net, kwargs in FULL_NETS:
        for cs in conv_shapes(net, 1, **kwargs):
            g = (cs.C, cs.H, cs.W, cs.K, cs.R, cs.S, cs.stride, cs.padding, cs.dilation, cs.groups)
            geoms.setdefault(g, f"{net}:{cs.name}")
    geoms[(8, 28, 28, 64, 1, 1, 1, 0, 1, 1)] = "1x1 C=8 (flat 1x1)"  # no ResNet has it; the kernel does
    families = {}
    for g, name in geoms.items():
        for batch in FULL_BATCHES:
            for dt in DTYPES:
                for fmt in ("nhwc", "nchw"):
                    for res in (False, True):
                        for act in conv.ACT_CODES:
                            base = Spec((batch, *g), dt, fmt, res, act, 0, f"{name} n={batch}")
                            args = kernel_args(base)
                            for cfg in conv.prune_configs(conv.GPU_CONFIGS, args):
                                spec = Spec(base.geom, dt, fmt, res, act, conv.GPU_CONFIGS.index(cfg), base.name)
                                flat = conv._is_flat(args["CG"], cfg.kwargs["BLOCK_K"])
                                families.setdefault(spec.family(flat, args["IS_1X1"]), spec)
    return list(families.values())


def _config_label(i: int) -> str:
    c = conv.GPU_CONFIGS[i]
    k = c.kwargs
    return f"#{i:<2d} {k['BLOCK_M']}x{k['BLOCK_N']}x{k['BLOCK_K']} w{c.num_warps} s{c.num_stages}"


def _print_row(row: Dict) -> None:
    s = row["spec"]
    what = (f"{s['dtype']:4s} {_config_label(s['config']):22s} {'flat' if row['flat'] else 'tile'} "
            f"{'1x1' if row['is_1x1'] else 'RxS'} {s['fmt']} {'res' if s['residual'] else '   '} {s['act']:8s}")
    if "error" in row:
        print(f"FAIL {what} {s['name']}\n     {row['error'][:2000]}")
        return
    status = "FAIL" if row["failures"] else "ok  "
    print(f"{status} {what} regs {row['regs']} spill {row['spill_stores']}/{row['spill_loads']} "
          f"smem {row['shared']}/{row['smem_estimate']} {row['units']} {s['name']}"
          + "".join(f"\n     {f}" for f in row["failures"]))


def summarize(rows: List[Dict]) -> None:
    """Per (dtype, config): kernels, registers, worst spill, shared memory, units."""
    groups: Dict[Tuple[str, int], List[Dict]] = {}
    for r in rows:
        if "error" not in r:
            groups.setdefault((r["spec"]["dtype"], r["spec"]["config"]), []).append(r)
    print(f"\n{'dtype':5s} {'config':22s} {'n':>4s} {'regs':>8s} {'max spill':>9s} {'spilling':>8s} "
          f"{'shared':>14s} units")
    for (dt, ci), rs in sorted(groups.items()):
        regs = [r["regs"] or 0 for r in rs]
        spills = [r["spill_stores"] or 0 for r in rs]
        shared = sorted({r["shared"] for r in rs})
        units = "/".join(sorted({r["units"] for r in rs}))
        print(f"{dt:5s} {_config_label(ci):22s} {len(rs):4d} {min(regs):3d}-{max(regs):3d} {max(spills):9d} "
              f"{sum(s > 0 for s in spills):8d} {shared[0]:6d}-{shared[-1]:6d} {units}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="representative kernels only (default)")
    mode.add_argument("--full", action="store_true", help="every config x specialization family")
    ap.add_argument("--arch", type=int, default=90, help="compute capability x10 (default 90)")
    ap.add_argument("-j", "--jobs", type=int, default=1, help="parallel compiles")
    ap.add_argument("--max-spill", type=int, default=None,
                    help="fail above this many bytes of spill stores (default: 64 for --quick, none for --full)")
    ap.add_argument("--json", help="write every result to this file")
    ap.add_argument("-q", "--quiet", action="store_true", help="print only failures and the summary")
    opts = ap.parse_args(argv)
    max_spill = opts.max_spill if opts.max_spill is not None else (None if opts.full else 64)
    _check_ptxas(opts.arch)
    conv._SMEM_FALLBACK = SMEM_LIMIT.get(opts.arch, SMEM_LIMIT[90])  # the pruner's limit off a GPU

    specs = full_specs() if opts.full else quick_specs()
    jobs = []
    for spec in specs:
        args = kernel_args(spec)
        if not opts.full and conv.GPU_CONFIGS[spec.config] not in conv.prune_configs(conv.GPU_CONFIGS, args):
            print(f"FAIL quick case {spec.name!r}: the pruner drops config {_config_label(spec.config)} for it")
            return 1
        jobs.append((asdict(spec), *specialize(args), opts.arch))
    print(f"compiling {len(jobs)} kernels for sm_{opts.arch} (triton {triton.__version__}, {opts.jobs} jobs)")
    t0 = time.time()
    if opts.jobs > 1:
        with ProcessPoolExecutor(opts.jobs) as pool:
            rows = list(pool.map(compile_one, jobs, chunksize=4))
    else:
        rows = [compile_one(j) for j in jobs]
    for r in rows:
        if max_spill is not None and (r.get("spill_stores") or 0) > max_spill:
            r["failures"].append(f"spills {r['spill_stores']} bytes > {max_spill}")
        if not opts.quiet or r["failures"]:
            _print_row(r)
    summarize(rows)
    failed = sum(bool(r["failures"]) for r in rows)
    print(f"\n{len(rows)} kernels, {failed} failed, {time.time() - t0:.0f} s")
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
