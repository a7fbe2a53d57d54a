"""Loads the compiled extension ``fastres._C`` if it was built.

The rest of the package works without it (torch and triton backends); this
module records why it is missing so that ``fastres.info()`` can say so.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import re
from typing import List, Optional, Sequence, Tuple

import torch

LOAD_ERROR: Optional[str] = None
if importlib.util.find_spec("fastres._C") is None:
    LOAD_ERROR = "fastres._C was not built"
else:
    try:
        importlib.import_module("fastres._C")  # registers the ops
    except ImportError as e:  # built against another torch, say
        LOAD_ERROR = f"{type(e).__name__}: {e}"
LOADED = LOAD_ERROR is None


def has_cuda_kernels() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("fastres::add_act_cuda", "CUDA")


def has_cpu_kernels() -> bool:
    """True when the extension's CPU kernels (``csrc/cpu/``, in every build) are registered."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key("fastres::_bn_act_cpu", "CPU")


def cuda_arch_list() -> Optional[List[str]]:
    """The architectures the CUDA kernels were compiled for, or None without them."""
    if not has_cuda_kernels():
        return None
    return torch.ops.fastres._cuda_arch_list().split()


def cuda_conv_kernels() -> List[str]:
    """The compiled fused-conv kernels (``conv_bn_act_cuda``), as the routing rule names
    them ("sm90 128x128x64 cluster 2x1x1", "sm80 128x64x32", ...); [] without them."""
    if not LOADED or not hasattr(torch.ops.fastres, "_conv_bn_act_cuda_kernels"):
        return []
    return list(torch.ops.fastres._conv_bn_act_cuda_kernels())


def cuda_conv_kernel(dtype: torch.dtype, n: int, c: int, h: int, w: int, k: int, r: int, s: int,
                     stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
                     device: torch.device) -> str:
    """The kernel ``conv_bn_act_cuda`` runs this convolution (batch ``n``) with on the
    CUDA ``device`` (the routing rule's name, e.g. "sm90 128x128x64 cluster 2x1x1"),
    or "unsupported: <why>"; "" without the CUTLASS conv kernels."""
    if not LOADED or not hasattr(torch.ops.fastres, "_conv_bn_act_cuda_kernel"):
        return ""
    index = device.index if device.index is not None else torch.cuda.current_device()
    major = torch.cuda.get_device_capability(index)[0]
    sms = torch.cuda.get_device_properties(index).multi_processor_count
    return torch.ops.fastres._conv_bn_act_cuda_kernel(
        dtype, n, c, h, w, k, r, s, list(stride), list(padding), list(dilation), groups, major, sms)


def runs_on(arch_list: Sequence[str], capability: Tuple[int, int]) -> bool:
    """Whether kernels compiled for ``arch_list`` (TORCH_CUDA_ARCH_LIST entries) run on
    a GPU of compute capability ``capability``.

    CUDA's compatibility rules: machine code (SASS) for ``X.Y`` runs on ``X.Z`` with
    ``Z >= Y`` (same major); the architecture-specific ``X.Ya``/``X.Yf`` only on
    ``X.Y``/``X.Z``; embedded PTX (``X.Y+PTX``) on every GPU from ``X.Y`` on (the driver
    compiles it). An entry that is not a version (a name such as "Hopper") counts as
    running anywhere: it cannot be checked here.
    """
    for entry in arch_list:
        m = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry.strip())
        if m is None:
            return True
        arch = (int(m.group(1)), int(m.group(2)))
        if m.group(4) and capability >= arch:
            return True
        if m.group(3) == "a" and capability == arch:
            return True
        if m.group(3) != "a" and capability[0] == arch[0] and capability[1] >= arch[1]:
            return True
    return False


def device_unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the ``"cuda"`` backend cannot run on ``device`` (a CUDA device), or None if it can:
    the extension's kernels must have been compiled for the device's architecture."""
    reason = unavailable_reason()
    if reason is not None:
        return reason
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _arch_reason(index)


@torch.compiler.assume_constant_result  # a Python value per device: no graph break when traced
@functools.lru_cache(maxsize=None)
def _arch_reason(device_index: int) -> Optional[str]:
    capability = tuple(torch.cuda.get_device_capability(device_index))
    archs = cuda_arch_list() or []
    if runs_on(archs, capability):
        return None
    return (
        f"fastres._C's CUDA kernels were compiled for {' '.join(archs)} (TORCH_CUDA_ARCH_LIST), "
        f"none of which runs on this GPU of compute capability {capability[0]}.{capability[1]}; rebuild with "
        f"TORCH_CUDA_ARCH_LIST={capability[0]}.{capability[1]}"
    )


def unavailable_reason() -> Optional[str]:
    """Why the ``"cuda"`` backend cannot run on any device, or None if it can."""
    if not LOADED:
        return (
            "the compiled extension fastres._C could not be loaded "
            f"({LOAD_ERROR}); build it with `pip install -e . --no-build-isolation`"
        )
    if not has_cuda_kernels():
        return (
            "fastres._C was built without CUDA kernels (no nvcc or CPU-only torch at build "
            "time, or FASTRES_BUILD_CUDA=0)"
        )
    return None


def cuda_conv_unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
    dilation: Sequence[int], groups: int,
) -> Optional[str]:
    """Why ``conv_bn_act_cuda`` cannot run ``conv2d(x, weight, None, stride, padding,
    dilation, groups)``, or None if it can.

    The one rule (dtype, TF32 permission, channels per group, window size,
    compute capability, 32-bit coordinates, the 2^31-byte tensor limit) lives in
    C++ (``csrc/cuda/conv_bn_act.cu`` ``unsupported_reason``), which the op checks
    too; it is asked through ``torch.ops.fastres._conv_bn_act_cuda_unsupported``;
    docs/cuda_conv.md lists it. For routing ``backend=None`` past the cuda backend.
    """
    if x.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {x.device.type} tensors"
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    _, c, h, w = (int(v) for v in x.shape)
    k, _, r, s = (int(v) for v in weight.shape)
    return _conv_unsupported(
        x.dtype, c, h, w, k, r, s, tuple(stride), tuple(padding), tuple(dilation), int(groups), index,
        bool(torch.backends.cudnn.allow_tf32),
    )


@torch.compiler.assume_constant_result  # a Python value of the shapes: no graph break when traced
@functools.lru_cache(maxsize=None)
def _conv_unsupported(dtype, c, h, w, k, r, s, stride, padding, dilation, groups, device_index, allow_tf32):
    # allow_tf32 is in the cache key because the C++ rule reads it.
    reason = device_unavailable_reason(torch.device("cuda", device_index))
    if reason is not None:
        return reason
    if not hasattr(torch.ops.fastres, "_conv_bn_act_cuda_unsupported"):
        return "fastres._C was built without the CUTLASS conv kernels (setup.py found no CUTLASS)"
    major = torch.cuda.get_device_capability(device_index)[0]
    return torch.ops.fastres._conv_bn_act_cuda_unsupported(
        dtype, c, h, w, k, r, s, list(stride), list(padding), list(dilation), groups, major
    ) or None
