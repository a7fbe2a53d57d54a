"""The benchmark's plots (matplotlib, Agg), drawn from the result rows alone.

At most three PNGs, each written only when its data exist:

* ``throughput.png``: eval images/s per model and image size (one panel each: a
  16x16 host-overhead row never shares a line with 224x224 ones), one line per
  provider over the batch sweep (horizontal bars when a single batch size was run);
* ``kernels.png``: speedup of every provider over eager, per kernel case (log scale);
* ``memory.png`` (GPU): peak memory per model and provider, eval and training,
  laid out like ``throughput.png``.
"""
from __future__ import annotations

import os
from typing import Dict, List

MAX_PLOTS = 3


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _key(r: dict) -> str:
    return f"{r['provider']} {r['dtype']} " + ("NCHW" if r.get("layout") == "nchw" else "CL")


def _times(v, _pos=None) -> str:
    return f"{v:g}x"


def _per_arch(rows: List[dict], value, xlabel: str, title: str, path: str, log: bool = False) -> bool:
    """One subplot per model and image size: a line per provider over the batch sweep, or
    horizontal bars when a single batch size was run. ``value(row)`` is plotted."""
    if not rows:
        return False
    plt = _plt()
    panels = list(dict.fromkeys((r["arch"], r.get("image_size")) for r in rows))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.8), squeeze=False)
    for ax, (arch, size) in zip(axes[0], panels):
        mine = [r for r in rows if r["arch"] == arch and r.get("image_size") == size]
        keys = list(dict.fromkeys(_label(r) for r in mine))
        batches = sorted({r["batch"] for r in mine})
        if len(batches) > 1:
            for k in keys:
                pts = sorted((r["batch"], value(r)) for r in mine if _label(r) == k)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                        linestyle="--" if "tv-" in k else "-", label=k)
            ax.set_xscale("log", base=2)
            if log:
                ax.set_yscale("log")
            ax.set_xlabel("batch size")
            ax.set_ylabel(xlabel)
            ax.legend(fontsize=7)
        else:
            vals = [next(value(r) for r in mine if _label(r) == k) for k in keys]
            colors = ["tab:gray" if "tv-" in k else "tab:blue" for k in keys]
            ax.barh(range(len(keys)), vals, color=colors)
            ax.set_yticks(range(len(keys)), keys, fontsize=7)
            ax.invert_yaxis()
            if log:
                ax.set_xscale("log")
            ax.set_xlabel(f"{xlabel} (batch {batches[0]})")
        ax.set_title(f"{arch} {title}" + (f", {size}x{size}" if size else ""))
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _label(r: dict) -> str:
    return ("train: " if r.get("suite") == "train" else "") + _key(r)


def _throughput(rows: List[dict], path: str) -> bool:
    return _per_arch([r for r in rows if r.get("suite") == "models"], lambda r: r["images_per_s"], "images/s",
                     "eval", path)


def _kernels(rows: List[dict], path: str) -> bool:
    rows = [r for r in rows if r.get("suite") in ("ops", "conv") and r.get("speedup_vs_eager")]
    if not rows:
        return False
    plt = _plt()
    ops = list(dict.fromkeys(r["op"] for r in rows))
    heights = []
    for op in ops:
        heights.append(len({(r["case"], r["batch"]) for r in rows if r["op"] == op}))
    fig, axes = plt.subplots(len(ops), 1, figsize=(11, sum(1.0 + 0.32 * h for h in heights)), squeeze=False,
                             gridspec_kw={"height_ratios": [max(h, 2) for h in heights]})
    for ax, op in zip(axes[:, 0], ops):
        mine = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys((r["case"], r["batch"]) for r in mine))
        provs = [p for p in dict.fromkeys(r["provider"] for r in mine) if p != "eager"]
        width = 0.8 / max(1, len(provs))
        for i, p in enumerate(provs):
            vals: Dict[tuple, float] = {(r["case"], r["batch"]): r["speedup_vs_eager"] for r in mine
                                        if r["provider"] == p}
            ys = [j + i * width for j in range(len(cases)) if cases[j] in vals]
            got = [vals[c] for c in cases if c in vals]
            # bars grow from 1x (no change) to the speedup, right if faster, left if slower
            ax.barh(ys, [v - 1.0 for v in got], left=1.0, height=width, label=p)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        speeds = [r["speedup_vs_eager"] for r in mine]
        ax.set_xlim(min(0.5, min(speeds) / 1.2), max(2.0, max(speeds) * 1.2))
        ax.xaxis.set_major_formatter(_times)
        ax.xaxis.set_minor_formatter(_times)
        ax.set_yticks([j + 0.4 - width / 2 for j in range(len(cases))], [f"N={b} {c}" for c, b in cases], fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{op}: speedup over eager (higher is better)")
        ax.legend(fontsize=7, loc="lower right")
        ax.grid(alpha=0.3, axis="x")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _memory(rows: List[dict], path: str) -> bool:
    rows = [r for r in rows if r.get("suite") in ("models", "train") and r.get("peak_mem_mib") is not None]
    return _per_arch(rows, lambda r: r["peak_mem_mib"] / 1024, "peak GiB (max_memory_allocated)",
                     "peak memory, eval and train", path, log=True)


PLOTS = (("throughput.png", _throughput), ("kernels.png", _kernels), ("memory.png", _memory))
assert len(PLOTS) <= MAX_PLOTS


def write_plots(result: dict, out_dir: str) -> List[str]:
    """Draw every plot whose data exist into ``out_dir``; returns the file names written."""
    written = []
    for name, draw in PLOTS:
        path = os.path.join(out_dir, name)
        if draw(result.get("rows", []), path):
            written.append(name)
        elif os.path.exists(path):
            os.remove(path)  # stale, from an earlier run into the same folder
    return written
