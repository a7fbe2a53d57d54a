"""Loads the compiled extension ``fastres._C`` if it was built.

The rest of the package works without it (torch and triton backends); this
module records why it is missing so that ``fastres.info()`` can say so.
"""
from __future__ import annotations

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
