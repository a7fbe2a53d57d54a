"""Loads the compiled extension ``fastres._C`` if it was built.

The rest of the package works without it (torch and triton backends); this
module records why it is missing so that ``fastres.info()`` can say so.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import List, Optional

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


def cuda_arch_list() -> Optional[List[str]]:
    """The architectures the CUDA kernels were compiled for, or None without them."""
    if not has_cuda_kernels():
        return None
    return torch.ops.fastres._cuda_arch_list().split()


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


def cuda_conv_unsupported_reason(x: torch.Tensor, weight: torch.Tensor, groups: int) -> Optional[str]:
    """Why ``conv_bn_act_cuda`` cannot run ``conv2d(x, weight, groups=groups)``, or None if it can.

    The rules (dtype, TF32 permission, channels per group, window size, compute
    capability) live in C++ (``csrc/cuda/conv_bn_act.cu``) and are asked through
    ``torch.ops.fastres._conv_bn_act_cuda_unsupported``; docs/cuda_conv.md lists
    them. For routing ``backend=None`` past the cuda backend.
    """
    if x.device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {x.device.type} tensors"
    index = x.device.index if x.device.index is not None else torch.cuda.current_device()
    k, _, r, s = (int(v) for v in weight.shape)
    return _conv_unsupported(
        x.dtype, int(x.shape[1]), k, r, s, int(groups), index, bool(torch.backends.cudnn.allow_tf32)
    )


@torch.compiler.assume_constant_result  # a Python value of the shapes: no graph break when traced
@functools.lru_cache(maxsize=None)
def _conv_unsupported(dtype, c, k, r, s, groups, device_index, allow_tf32) -> Optional[str]:
    # allow_tf32 is in the cache key because the C++ rule reads it.
    reason = unavailable_reason()
    if reason is not None:
        return reason
    if not hasattr(torch.ops.fastres, "_conv_bn_act_cuda_unsupported"):
        return "fastres._C was built without the CUTLASS conv kernels (setup.py found no CUTLASS)"
    major = torch.cuda.get_device_capability(device_index)[0]
    return torch.ops.fastres._conv_bn_act_cuda_unsupported(dtype, c, k, r, s, groups, major) or None
