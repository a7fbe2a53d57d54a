"""Results: the terminal tables, the targets, the Markdown report and the output folder.

``python -m benchmarks.report DIR`` re-renders ``DIR/report.md`` and the plots
from ``DIR/results.json`` (e.g. after a GPU run made with ``--no-plots``).
"""
from __future__ import annotations

import argparse
import json
import math
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SCHEMA = 1
SUITES = ("models", "train", "ops", "conv")

# Every row carries these environment fields (the rest is in results.json's "environment").
ROW_ENV_KEYS = ("device", "device_type", "torch", "cuda", "triton", "fastres", "fastres_commit")

# ----------------------------------------------------------------------------
# Tables.
# ----------------------------------------------------------------------------

Column = Tuple[str, str, Callable[[object], str]]


def _fmt(spec: str) -> Callable[[object], str]:
    def f(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        return spec.format(v)
    return f


def _range(row) -> str:
    return "-" if row.get("ms_p20") is None else f"{row['ms_p20']:.3g}-{row['ms_p80']:.3g}"


def _compile_s(row) -> str:
    kind = row.get("compile_mode") or ("capture" if str(row.get("provider", "")).endswith("cudagraph") else None)
    return "-" if kind is None or row.get("first_call_s") is None else f"{row['first_call_s']:.1f}"


MODEL_COLUMNS: List[Column] = [
    ("arch", "model", _fmt("{}")), ("image_size", "px", _fmt("{}")), ("batch", "batch", _fmt("{}")),
    ("provider", "provider", _fmt("{}")),
    ("dtype", "dtype", _fmt("{}")), ("layout", "layout", _fmt("{}")),
    ("images_per_s", "img/s", _fmt("{:.1f}")), ("ms", "ms/batch", _fmt("{:.3g}")),
    ("", "p20-p80", _range), ("peak_mem_mib", "peak MiB", _fmt("{:.0f}")),
    ("prepared_mib", "prepared MiB", _fmt("{:.1f}")), ("conv_paths", "CPU conv paths", _fmt("{}")),
    ("", "compile/capture s", _compile_s),
    ("conv_backends", "conv backends", _fmt("{}")), ("tune_s", "tuning s", _fmt("{:.1f}")),
    ("max_abs_err", "max abs err", _fmt("{:.2e}")), ("rel_l2_err", "rel-L2 err", _fmt("{:.2e}")),
    ("speedup_vs_tv_fp32", "vs tv fp32", _fmt("{:.2f}x")), ("speedup_vs_tv_same", "vs tv same dtype", _fmt("{:.2f}x")),
]

TRAIN_COLUMNS: List[Column] = [
    ("arch", "model", _fmt("{}")), ("batch", "batch", _fmt("{}")), ("provider", "provider", _fmt("{}")),
    ("", "dtype", lambda r: ("amp " if r.get("amp") else "") + str(r.get("dtype"))),
    ("layout", "layout", _fmt("{}")), ("images_per_s", "img/s", _fmt("{:.1f}")), ("ms", "ms/step", _fmt("{:.3g}")),
    ("", "p20-p80", _range), ("peak_mem_mib", "peak MiB", _fmt("{:.0f}")),
    ("saved_mib", "saved for bwd MiB", _fmt("{:.0f}")), ("saved_vs_tv", "saved vs tv", _fmt("{:.2f}x")),
    ("saved_vs_tv_compile", "saved vs tv-compile", _fmt("{:.2f}x")),
    ("rel_l2_err", "rel-L2 err (step 1 logits)", _fmt("{:.2e}")),
    ("speedup_vs_tv_same", "vs tv same dtype", _fmt("{:.2f}x")),
]

KERNEL_COLUMNS: List[Column] = [
    ("case", "case", _fmt("{}")), ("batch", "N", _fmt("{}")), ("provider", "provider", _fmt("{}")),
    ("ms", "median ms", _fmt("{:.4f}")), ("ms_p20", "p20", _fmt("{:.4f}")), ("ms_p80", "p80", _fmt("{:.4f}")),
    ("gbps", "GB/s", _fmt("{:.0f}")), ("frac_copy_bw", "of copy BW", _fmt("{:.0%}")),
    ("tflops", "TFLOP/s", _fmt("{:.1f}")), ("frac_peak_flops", "of matmul peak", _fmt("{:.0%}")),
    ("speedup_vs_eager", "vs eager", _fmt("{:.2f}x")), ("speedup_vs_best_stock", "vs best stock", _fmt("{:.2f}x")),
    ("rel_diff_vs_eager", "diff vs eager", _fmt("{:.1e}")),
    ("", "chosen", lambda r: str(r.get("backend"))[5:] if str(r.get("backend")).startswith("auto:") else "-"),
]

SUITE_COLUMNS = {"models": MODEL_COLUMNS, "train": TRAIN_COLUMNS, "ops": KERNEL_COLUMNS, "conv": KERNEL_COLUMNS}
SUITE_TITLES = {
    "models": "Models: eval throughput",
    "train": "Training: one optimizer step",
    "ops": "Kernels: elementwise fusions (add_act, bn_act)",
    "conv": "Kernels: conv_bn_act",
}


def _columns_for(rows: Sequence[dict], columns: List[Column]) -> List[Column]:
    """Drop columns that are empty in every row (e.g. TFLOP/s for elementwise ops, memory on CPU)."""
    keep = []
    for col in columns:
        key, _, fmt = col
        if any(fmt(r.get(key) if key else r) != "-" for r in rows):
            keep.append(col)
    return keep


def _cells(rows: Sequence[dict], columns: List[Column]) -> List[List[str]]:
    return [[fmt(r.get(key) if key else r) for key, _, fmt in columns] for r in rows]


def text_table(rows: Sequence[dict], columns: List[Column] = KERNEL_COLUMNS) -> str:
    columns = _columns_for(rows, columns)
    head = [title for _, title, _ in columns]
    body = _cells(rows, columns)
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    return "\n".join([line(head), line(["-" * w for w in widths]), *map(line, body)])


def markdown_table(rows: Sequence[dict], columns: List[Column] = KERNEL_COLUMNS) -> str:
    columns = _columns_for(rows, columns)
    head = [title for _, title, _ in columns]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if i < 3 else "---:" for i in range(len(head))) + "|"]
    out += ["| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |" for cells in _cells(rows, columns)]
    return "\n".join(out)


def suite_rows(result: dict, suite: str) -> List[dict]:
    return [r for r in result.get("rows", []) if r.get("suite") == suite]


def text_tables(result: dict) -> str:
    parts = []
    for suite in SUITES:
        rows = suite_rows(result, suite)
        if rows:
            parts += [f"\n== {SUITE_TITLES[suite]} ==", text_table(rows, SUITE_COLUMNS[suite])]
    targets = result.get("targets") or evaluate_targets(result)
    if targets:
        parts += ["\n== Targets ==", text_table(targets, TARGET_COLUMNS)]
    return "\n".join(parts)


# ----------------------------------------------------------------------------
# Targets.
# ----------------------------------------------------------------------------

TARGET_COLUMNS: List[Column] = [
    ("name", "target", _fmt("{}")), ("goal", "goal", _fmt("{}")), ("value", "measured", _fmt("{}")),
    ("status", "status", _fmt("{}")),
]

# A target's "source": which definition in docs/benchmarks.md (Targets) it checks.
CPU_GOAL = "CPU goal"

# rel-L2 of fastres's logits may be at most this multiple of torchvision's in the same
# dtype and layout, or the floor (fp32 rows on a GPU use TF32 convolutions, PyTorch's default).
ERROR_FACTOR = 2.0
ERROR_FLOOR = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 2e-2}


def _find(rows, **kw) -> Optional[dict]:
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


# A timing whose p80 exceeds its p20 by more than this was disturbed (other processes, clocks):
# a target decided on it is marked as such.
NOISY_SPREAD = 1.25


def spread(row: dict) -> Optional[float]:
    """p80 / p20 of a row's time (1.0 = perfectly steady)."""
    if not row.get("ms_p20") or row.get("ms_p80") is None:
        return None
    return row["ms_p80"] / row["ms_p20"]


def _ratio_target(name, goal, source, numer: Optional[dict], denom: Optional[dict], threshold: float) -> dict:
    if numer is None or denom is None:
        return {"name": name, "goal": goal, "value": None, "status": "not measured", "source": source}
    ratio = numer["images_per_s"] / denom["images_per_s"]
    status = "met" if ratio >= threshold else "NOT met"
    worst = max((s for s in (spread(numer), spread(denom)) if s is not None), default=None)
    if worst is not None and worst > NOISY_SPREAD:
        status += f" (noisy timings, p80/p20 up to {worst:.2f}: rerun on a quiet machine)"
    return {"name": name, "goal": goal, "value": f"{ratio:.2f}x ({numer['images_per_s']:.1f} vs "
            f"{denom['images_per_s']:.1f} img/s)", "ratio": ratio, "status": status, "source": source}


def _accuracy_target(rows: List[dict], suite: str) -> Optional[dict]:
    fast = [r for r in rows if r["suite"] == suite and str(r["provider"]).startswith("fastres")]
    if not fast:
        return None
    worst, bad = 0.0, []
    for r in fast:
        tv = _find(rows, suite=suite, arch=r["arch"], batch=r["batch"], provider="tv-eager", dtype=r["dtype"],
                   layout=r["layout"]) or _find(rows, suite=suite, arch=r["arch"], batch=r["batch"],
                                                provider="tv-eager", dtype=r["dtype"])
        limit = max(ERROR_FACTOR * (tv["rel_l2_err"] if tv else 0.0), ERROR_FLOOR.get(r["dtype"], 1e-3))
        ratio = r["rel_l2_err"] / limit if math.isfinite(r["rel_l2_err"]) else math.inf
        worst = max(worst, ratio)
        if not ratio <= 1.0:
            bad.append(f"{r['arch']} N={r['batch']} {r['provider']} {r['dtype']}")
    what = "eval logits" if suite == "models" else "first training step's logits"
    return {"name": f"fastres {what} as accurate as torchvision", "source": "benchmark gate",
            "goal": f"rel-L2 vs torchvision fp32 <= max({ERROR_FACTOR:g} x torchvision's in the same dtype, "
                    f"{ERROR_FLOOR['float32']:g} fp32 / {ERROR_FLOOR['bfloat16']:g} bf16 / "
                    f"{ERROR_FLOOR['float16']:g} fp16)",
            "value": f"{len(fast) - len(bad)}/{len(fast)} rows within; worst at {worst:.2f} of its limit"
                     + (f"; failing: {', '.join(bad[:4])}" if bad else ""),
            "status": "met" if not bad else "NOT met"}


def evaluate_targets(result: dict) -> List[dict]:
    """The CPU speed targets, the accuracy gate, and the GPU speed goals (docs/benchmarks.md, Targets)."""
    rows = result.get("rows", [])
    device_type = (result.get("environment") or {}).get("device_type")
    models = [r for r in rows if r.get("suite") == "models"]
    out: List[dict] = []
    if device_type == "cpu":
        host = [r for r in models if r.get("image_size") == 16]
        models = [r for r in models if r.get("image_size", 224) == 224]
        fast = _find(models, arch="resnet50", batch=8, provider="fastres-torch", dtype="float32",
                     layout="channels_last")
        out.append(_ratio_target(
            "CPU: ResNet-50 eval, batch 8, fastres vs torchvision eager NCHW", ">= 1.40x", CPU_GOAL, fast,
            _find(models, arch="resnet50", batch=8, provider="tv-eager", dtype="float32", layout="nchw"), 1.4))
        out.append(_ratio_target(
            "CPU: ResNet-50 eval, batch 8, fastres vs torchvision channels_last + fx fuse", ">= 1.00x", CPU_GOAL, fast,
            _find(models, arch="resnet50", batch=8, provider="tv-fx-fuse", dtype="float32"), 1.0))
        out += _cpu_prepared_targets(models, host)
        out += _cpu_train_targets([r for r in rows if r.get("suite") == "train"])
    isolation = _isolation_target(rows)
    if isolation:
        out.append(isolation)
    for suite in ("models", "train"):
        acc = _accuracy_target(rows, suite)
        if acc:
            out.append(acc)
    if device_type == "cuda":
        out += _gpu_goals(rows)
    return out


# A provider timed right after a third-party engine may be at most this much slower (or faster)
# than right after a stock PyTorch provider (benchmarks.timing.order_check): beyond it, the timings depend on order.
ISOLATION_TOLERANCE = 0.10


def _isolation_target(rows: List[dict]) -> Optional[dict]:
    """The benchmark gate on timing isolation: the CPU rows that were order-checked."""
    checked = [r for r in rows if r.get("after_engine_ratio") is not None]
    if not checked:
        return None
    worst = max(checked, key=lambda r: abs(r["after_engine_ratio"] - 1))
    bad = [r for r in checked if abs(r["after_engine_ratio"] - 1) > ISOLATION_TOLERANCE]
    return {"name": "timings independent of the provider before (fastres right after ONNX Runtime/OpenVINO "
                    "vs right after stock PyTorch)",
            "goal": f"time ratio within 1 +- {ISOLATION_TOLERANCE:.2f}", "source": "benchmark gate",
            "value": f"{len(checked) - len(bad)}/{len(checked)} cases within; worst {worst['after_engine_ratio']:.2f}x "
                     f"({worst['arch']} N={worst['batch']} {worst['image_size']}px {worst['dtype']})",
            "status": "met" if not bad else "NOT met"}


def _cpu_prepared_targets(models: List[dict], host: List[dict]) -> List[dict]:
    """The prepared-weight CPU targets: ResNet-50 fastres (no compile step) against torch.compile with
    freezing and torchvision channels_last eager per dtype and batch, the host overhead, accuracy."""
    out = []
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 8):
            fast = _find(models, arch="resnet50", batch=batch, provider="fastres-torch", dtype=dtype,
                         layout="channels_last")
            if fast is None:
                continue
            for base, label in (("tv-compile-freezing", "torch.compile(freezing)"), ("tv-eager", "torchvision CL eager")):
                out.append(_ratio_target(
                    f"CPU: ResNet-50 eval {dtype} batch {batch}, fastres vs {label}", ">= 1.00x", CPU_GOAL, fast,
                    _find(models, arch="resnet50", batch=batch, provider=base, dtype=dtype, layout="channels_last"),
                    1.0))
            tv = _find(models, arch="resnet50", batch=batch, provider="tv-eager", dtype=dtype, layout="channels_last")
            if dtype != "float32" and tv is not None:
                ratio = fast["rel_l2_err"] / tv["rel_l2_err"]
                out.append({"name": f"CPU: ResNet-50 {dtype} batch {batch} logits error vs torchvision's",
                            "goal": "<= 1.5x", "value": f"{ratio:.2f}x ({fast['rel_l2_err']:.2e} vs "
                            f"{tv['rel_l2_err']:.2e} rel-L2)", "ratio": ratio,
                            "status": "met" if ratio <= 1.5 else "NOT met", "source": CPU_GOAL})
            elif dtype == "float32":
                err = fast["rel_l2_err"]
                out.append({"name": f"CPU: ResNet-50 fp32 batch {batch} logits rel-L2 error", "goal": "< 1e-4",
                            "value": f"{err:.2e}", "status": "met" if err < 1e-4 else "NOT met",
                            "source": CPU_GOAL})
    for dtype, layout, label in (("float32", "channels_last", "CL"), ("bfloat16", "channels_last", "CL"),
                                 ("float32", "nchw", "NCHW")):
        fast = _find(host, arch="resnet50", provider="fastres-torch", dtype=dtype, layout=layout)
        if fast is not None:
            out.append(_ratio_target(
                f"CPU: host overhead, ResNet-50 1x3x16x16 {dtype} {label}, fastres vs torchvision {label} eager",
                ">= 1.00x", CPU_GOAL, fast,
                _find(host, arch="resnet50", provider="tv-eager", dtype=dtype, layout=layout), 1.0))
    for batch in (1, 8):  # torchvision's default: NCHW input, NCHW model
        fast = _find(models, arch="resnet50", batch=batch, provider="fastres-torch", dtype="float32", layout="nchw")
        if fast is not None:
            out.append(_ratio_target(
                f"CPU: ResNet-50 eval float32 NCHW batch {batch}, fastres vs torchvision NCHW eager", ">= 1.00x",
                CPU_GOAL, fast, _find(models, arch="resnet50", batch=batch, provider="tv-eager", dtype="float32",
                                      layout="nchw"), 1.0))
    return out


def _cpu_train_targets(train: List[dict]) -> List[dict]:
    """The CPU training targets: each fastres training-step row (either memory mode) at least as
    fast as torchvision eager in the same model, batch, dtype and layout (the rows measured only)."""
    out = []
    for fast in train:
        if not str(fast["provider"]).startswith("fastres-"):
            continue
        mode = 'training_memory="min"' if fast["provider"].endswith("-min") else "default memory mode"
        out.append(_ratio_target(
            f"CPU: train step {fast['arch']} batch {fast['batch']} {fast['dtype']} {fast['layout']}, fastres "
            f"({mode}) vs torchvision eager", ">= 1.00x", CPU_GOAL, fast,
            _find(train, arch=fast["arch"], batch=fast["batch"], provider="tv-eager", dtype=fast["dtype"],
                  layout=fast["layout"]), 1.0))
    return out


def _gpu_goals(rows: List[dict]) -> List[dict]:
    """The GPU speed goals: fastres at
    least as fast as the matching stock PyTorch provider, same dtype and layout, ResNet-50."""
    out = []
    pairs = [("models", "fastres eager (best backend)", None, "tv-eager"),
             ("models", "fastres-cudagraph", "fastres-cudagraph", "tv-cudagraph"),
             ("models", "fastres-compile", "fastres-compile", "tv-compile"),
             ("train", "fastres training step (best backend)", None, "tv-eager")]
    for suite, label, provider, base in pairs:
        ratios = []
        for b in rows:
            if b.get("suite") != suite or b.get("arch") != "resnet50" or b.get("provider") != base:
                continue
            cands = [r for r in rows if r.get("suite") == suite and r.get("arch") == "resnet50"
                     and r["batch"] == b["batch"] and r["dtype"] == b["dtype"] and r["layout"] == b["layout"]
                     and (r["provider"] == provider if provider else
                          r["provider"] in ("fastres-cuda", "fastres-triton"))]
            if cands:
                best = max(cands, key=lambda r: r["images_per_s"])
                ratios.append((best["images_per_s"] / b["images_per_s"], b["batch"], b["dtype"]))
        name = f"GPU: ResNet-50 {'eval' if suite == 'models' else 'train'}, {label} vs {base}"
        if not ratios:
            out.append({"name": name, "goal": ">= 1.00x", "value": None, "status": "not measured",
                        "source": "project goal"})
            continue
        worst = min(ratios)
        out.append({"name": name, "goal": ">= 1.00x at every batch", "source": "project goal",
                    "value": "; ".join(f"N={n} {d}: {r:.2f}x" for r, n, d in sorted(ratios, key=lambda t: t[1])),
                    "status": "met" if worst[0] >= 1.0 else "NOT met"})
    kern = [r for r in rows if r.get("suite") in ("ops", "conv") and r["provider"] in ("fastres-cuda", "fastres-triton")
            and r.get("speedup_vs_best_stock")]
    for op in ("add_act", "bn_act", "conv_bn_act"):
        best: Dict[tuple, float] = {}
        for r in kern:
            if r["op"] == op:
                key = (r["case"], r["batch"])
                best[key] = max(best.get(key, 0.0), r["speedup_vs_best_stock"])
        if best:
            geo = math.exp(sum(math.log(v) for v in best.values()) / len(best))
            out.append({"name": f"GPU: {op}, fastres (best backend) vs fastest stock provider, geomean",
                        "goal": ">= 1.00x", "value": f"{geo:.2f}x over {len(best)} cases "
                        f"(min {min(best.values()):.2f}x)", "status": "met" if geo >= 1.0 else "NOT met",
                        "source": "project goal"})
    return out


# ----------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------

METHOD = """\
- **Kernels** (`--suite ops conv`): every provider of a case runs in this one process, after a
  first untimed call (compilation, autotuning). GPU: `triton.testing.do_bench`
  (CUDA events, L2 flushed by zeroing a 256 MB buffer before every call, warm-up; median, p20,
  p80). CPU: a host timer, the providers of a case in interleaved rounds (one call of each in
  turn, the first rotating), so that other processes' load falls on all alike. GB/s counts the least traffic the op needs (each input
  read once, the output written once); TFLOP/s counts the direct convolution's 2·N·K·P·Q·C·R·S only (Winograd-type algorithms do
  fewer, so more than 100% of the matmul peak is possible). Fractions are of the
  copy bandwidth and the dense matmul throughput measured at the start of this same run, not of
  spec-sheet numbers. `vs best stock` divides the fastest stock PyTorch provider's time (eager,
  torch.compile, cuDNN fused with BN folded in fp32 / folded conv on CPU) by the row's.
  `diff vs eager` is max|y - eager| / max|eager|.
- **Models** (`--suite models`): each provider gets its own copy of one torchvision model with
  seeded random weights and random BN statistics (fastres: `fastres.convert` of it), and the same
  input. The first call is timed alone (compile time for torch.compile rows, capture for CUDA
  graph rows); then, on a GPU, warm-up and trials of back-to-back iterations (about 200 ms each)
  between CUDA events, one provider at a time; on a CPU, interleaved rounds of one forward per
  provider. The median (p20-p80) over trials is reported; a target decided on rows whose p80/p20
  exceeds 1.25 is flagged as noisy. Peak memory
  is `torch.cuda.max_memory_allocated` over the timed trials, after freeing the previous case and
  `reset_peak_memory_stats` (so it counts weights, input, activations). The error columns compare
  the logits with torchvision fp32 NCHW on the same device with TF32 off (max abs, and
  ||y - ref|| / ||ref||). `vs tv fp32`: speedup over torchvision eager fp32 NCHW; `vs tv same
  dtype`: over torchvision eager in the row's dtype (channels_last).
- **Training** (`--suite train`): one step = forward, cross-entropy, backward, SGD with momentum,
  `zero_grad(set_to_none=True)`; on a GPU under autocast to the dtype with fp32 weights. The error
  is that of the first step's logits against torchvision fp32 in train mode (batch statistics).
  "Saved for bwd" is the bytes of the distinct storages autograd saves during the first step's
  forward (`benchmarks/saved.py`: `saved_tensors_hooks`, parameters included; the same on any
  device), against torchvision eager (`saved vs tv`) and `torch.compile`d torchvision
  (`saved vs tv-compile`, whose partitioner recomputes cheap ops) in the same dtype and layout.
  `fastres-<backend>-min` rows use `fastres.set_training_memory(model, "min")`.
- On a GPU, `torch.backends.cudnn.benchmark` is on for every provider (cuDNN picks its fastest
  algorithms, as Triton autotunes), unless `--no-cudnn-benchmark`; TF32 settings are PyTorch's
  defaults (recorded in the environment). `tv-compile-max-autotune` uses CUDA graphs (that mode's
  default); `tv-compile`/`fastres-compile` (mode default) do not.
"""


def _env_lines(result: dict) -> List[str]:
    env = result.get("environment", {})
    lines = [
        f"- date: {result.get('date')}",
        f"- command: `{result.get('command')}`",
        f"- device: {env.get('device')} ({env.get('device_type')}"
        + (f", {env['sm_count']} SMs, {env['gpu_memory_gb']} GB, sm_{env['compute_capability']}" if env.get("sm_count") else "")
        + (f", {env.get('threads')} threads" if env.get("device_type") == "cpu" else "") + ")",
        f"- torch {env.get('torch')}, CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, triton {env.get('triton')}, "
        f"Python {env.get('python')}",
        f"- fastres {env.get('fastres')}, commit {env.get('fastres_commit') or 'unknown (not a git checkout)'}, "
        f"CUDA kernels built: {env.get('cuda_kernels')}",
    ]
    if env.get("device_type") == "cpu":
        lines.append(f"- CPU ISA: {', '.join(env.get('cpu_isa') or []) or 'unknown'} (PyTorch: "
                     f"{env.get('cpu_capability')}); oneDNN native bf16: {env.get('onednn_bf16')}, "
                     f"fp16: {env.get('onednn_fp16')} (else fastres computes that dtype in fp32); "
                     f"{env.get('threads')} threads")
    if env.get("nvidia_smi"):
        lines.append(f"- nvidia-smi (driver, SM clock, max SM clock, memory clock, power limit): {env['nvidia_smi']}")
    if env.get("device_type") == "cuda":
        lines.append(f"- cudnn.benchmark={env.get('cudnn_benchmark')}, cudnn.allow_tf32={env.get('cudnn_allow_tf32')}, "
                     f"matmul.allow_tf32={env.get('matmul_allow_tf32')}")
    peaks = result.get("peaks", {})
    if peaks:
        lines.append(f"- measured in this run: copy bandwidth {peaks.get('copy_gbps', float('nan')):.0f} GB/s "
                     f"(read + write), dense matmul {peaks.get('matmul_tflops', float('nan')):.1f} TFLOP/s "
                     f"({peaks.get('matmul_dtype')}, {peaks.get('matmul_shape')})")
    cfg = result.get("config", {})
    if cfg:
        lines.append("- configuration: " + ", ".join(f"{k}={v}" for k, v in cfg.items()))
    if result.get("suite_seconds"):
        lines.append(f"- wall time: {result.get('elapsed_s', 0):.0f} s ("
                     + ", ".join(f"{k} {v:.0f} s" for k, v in result["suite_seconds"].items()) + ")")
    if result.get("interrupted"):
        lines.append(f"- **interrupted** ({result['interrupted']}): the tables hold what was measured before")
    return lines


def _tune_sections(result: dict) -> List[str]:
    """Per model row of a ``backend=None`` provider: the backend that ran each conv shape, how it was
    chosen, the measured ms per candidate and the tuning time (``fastres.tune``)."""
    from fastres.backends import tune_names

    names = tune_names()

    rows = [r for r in result.get("rows", []) if r.get("conv_choices")]
    if not rows:
        return []
    lines = ["## Per-shape backend choice (backend=None, `fastres.tune`)", "",
             "Keys are device|dtype|layout|geometry|batch bucket|epilogue; times are steady-state ms per "
             "call measured on the first call (first-call ms, with autotuning, in parentheses).", ""]
    for r in rows:
        lines += [f"### {r['arch']} N={r['batch']} {r['dtype']} {r['provider']}: {r.get('conv_backends')}, "
                  f"tuning {r.get('tune_s', 0.0):.1f} s of a {r.get('first_call_s', 0.0):.1f} s first call", "",
                  "| conv | backend | how | " + " | ".join(f"{c} ms" for c in names) + " | tuning ms |",
                  "|---|---|---|" + "---|" * (len(names) + 1)]
        for key, e in sorted(r["conv_choices"].items()):
            cells = []
            for c in names:
                ms, first = e.get("ms", {}).get(c), e.get("first_ms", {}).get(c)
                cells.append("-" if ms is None else f"{ms:.4f} ({first:.1f})")
            tune_ms = f"{e['tune_ms']:.0f}" if e.get("how") == "measured" else "-"
            lines.append(f"| {key.split('|', 1)[1]} | {e['choice']} | {e['how']} | " + " | ".join(cells)
                         + f" | {tune_ms} |")
        lines.append("")
    return lines


def markdown_report(result: dict, plots: Sequence[str] = ()) -> str:
    lines = ["# fastres benchmark report", "", *_env_lines(result), ""]
    targets = result.get("targets") or evaluate_targets(result)
    if targets:
        lines += ["## Targets", "", markdown_table(targets, TARGET_COLUMNS + [("source", "source", _fmt("{}"))]), ""]
    for suite in SUITES:
        rows = suite_rows(result, suite)
        if not rows:
            continue
        lines += [f"## {SUITE_TITLES[suite]}", ""]
        if suite in ("models", "train"):
            for arch in dict.fromkeys(r["arch"] for r in rows):
                lines += [f"### {arch}", "", markdown_table([r for r in rows if r["arch"] == arch],
                                                            SUITE_COLUMNS[suite]), ""]
        else:
            lines += [markdown_table(rows, SUITE_COLUMNS[suite]), ""]
    lines += _tune_sections(result)
    skipped = result.get("skipped") or []
    if skipped:
        lines += ["## Not measured", "", "| suite | case | provider | reason |", "|---|---|---|---|"]
        for s in skipped:
            case = s.get("case") or f"{s.get('arch')} N={s.get('batch')} {s.get('dtype', '')} {s.get('layout', '')}"
            lines.append(f"| {s.get('suite')} | {case} | {s.get('provider')} | {str(s.get('reason')).replace('|', '/')} |")
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    lines += ["## Method", "", METHOD]
    return "\n".join(lines)


# ----------------------------------------------------------------------------
# The output folder: results.json, report.md and at most 3 PNGs.
# ----------------------------------------------------------------------------


def write_outputs(result: dict, out_dir: str, plots: bool = True, markdown: bool = True) -> List[str]:
    """Write ``results.json``, (``markdown``) ``report.md`` and (``plots``) the PNGs; returns the paths written."""
    os.makedirs(out_dir, exist_ok=True)
    result["targets"] = evaluate_targets(result)
    names: List[str] = []
    if plots:
        from benchmarks import plots as plotting

        names = plotting.write_plots(result, out_dir)
        result["plots"] = names
    else:
        names = [p for p in result.get("plots", []) if os.path.exists(os.path.join(out_dir, p))]
    paths = [os.path.join(out_dir, "results.json")]
    with open(paths[0] + ".tmp", "w") as f:
        json.dump(result, f, indent=1, default=str)
    os.replace(paths[0] + ".tmp", paths[0])  # never a half-written results.json
    if markdown:
        paths.append(os.path.join(out_dir, "report.md"))
        with open(paths[1], "w") as f:
            f.write(markdown_report(result, names))
    return paths + [os.path.join(out_dir, n) for n in names]


def load(out_dir_or_file: str) -> dict:
    path = out_dir_or_file
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                     description="Re-render report.md and the plots from results.json.")
    parser.add_argument("dir", help="a benchmark output folder (holding results.json)")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--print", action="store_true", help="also print the tables")
    args = parser.parse_args(argv)
    result = load(args.dir)
    written = write_outputs(result, args.dir, plots=not args.no_plots)
    if args.print:
        print(text_tables(result))
    print("wrote " + ", ".join(written))


if __name__ == "__main__":
    main()
