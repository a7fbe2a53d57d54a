"""The benchmark's configuration: quick and full defaults per device (the
module docstring of ``benchmarks.__main__`` describes them), shared by the CLI
and by pytest-benchmark (``benchmarks/test_bench_kernels.py``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

ALL_SUITES = ("ops", "conv", "models", "train")
RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")


@dataclass
class Config:
    device: str
    full: bool
    suites: List[str]
    dtype: str
    model_archs: List[str]
    model_batches: List[int]
    train_archs: List[str]
    train_batches: List[int]
    kernel_archs: List[str]
    kernel_batches: List[int]
    image_size: int = 224
    reps: int = 5  # timed trials per model case; minimum timed calls per kernel case on CPU
    trial_ms: float = 200.0  # target length of one model trial (GPU)
    rep_ms: float = 100.0  # do_bench repetition time per kernel provider
    compile_modes: List[str] = field(default_factory=list)  # model suite; "freezing" is inductor's CPU freezing
    host_overhead: bool = True  # CPU: the ResNet-50 1x3x16x16 case (everything but the arithmetic)
    providers: List[str] = field(default_factory=list)  # substrings; empty = all
    time_limit_s: Optional[float] = None
    cudnn_benchmark: bool = True


def default_config(device: str, full: bool) -> Config:
    gpu = device.startswith("cuda")
    if gpu:
        return Config(
            device=device, full=full, suites=list(ALL_SUITES), dtype="bfloat16",
            model_archs=list(RESNETS) if full else ["resnet50", "resnet18"],
            model_batches=[1, 8, 32, 64, 128, 256] if full else [128],
            train_archs=["resnet50", "resnet18"], train_batches=[32, 128, 256] if full else [128],
            kernel_archs=["resnet50", "resnet18"], kernel_batches=[32, 256] if full else [64],
            reps=10 if full else 5, trial_ms=200.0, rep_ms=200.0 if full else 100.0,
            compile_modes=["default", "max-autotune"] if full else ["default"],
        )
    return Config(
        device=device, full=full, suites=list(ALL_SUITES) if full else ["ops", "conv", "models"], dtype="float32",
        model_archs=list(RESNETS) if full else ["resnet50"],
        model_batches=[1, 8, 16] if full else [1, 8],
        train_archs=["resnet50", "resnet18"], train_batches=[8],
        kernel_archs=["resnet50", "resnet18"], kernel_batches=[1, 8] if full else [8],
        reps=10, trial_ms=0.0, rep_ms=200.0 if full else 50.0, compile_modes=["freezing"],
    )


def compile_modes_for(cfg: Config, arch: str, batch: int) -> List[str]:
    """torch.compile modes timed for (arch, batch). GPU: quick, only the first arch at its first
    batch; full, mode default everywhere and max-autotune for ResNet-50 only. CPU (inductor
    freezing): ResNet-50 at every batch when quick, every model when full."""
    if not cfg.device.startswith("cuda"):
        return list(cfg.compile_modes) if cfg.full or arch == "resnet50" else []
    if not cfg.full:
        return list(cfg.compile_modes) if (arch, batch) == (cfg.model_archs[0], cfg.model_batches[0]) else []
    return [m for m in cfg.compile_modes if m == "default" or arch == "resnet50"]




def kernel_cases(cfg: Config, suite: str):
    """The kernel cases of ``suite`` ("ops" or "conv") under ``cfg``."""
    from benchmarks import cases

    return cases.kernel_cases(suite, cfg.kernel_archs, cfg.kernel_batches, quick=not cfg.full,
                              device_type="cuda" if cfg.device.startswith("cuda") else "cpu",
                              image_size=cfg.image_size)
