"""Which backend runs an op: validation of the name and the "best available" choice.

* ``"torch"``: the plain PyTorch reference (``fastres.reference``), any device.
* ``"triton"``: the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``"cuda"``: the compiled CUDA C++ kernels of ``fastres._C``; CUDA tensors of a GPU
  whose architecture the kernels were compiled for (``_extension.runs_on``).
* ``"cudnn"``: ``conv_bn_act`` only: cuDNN's fused convolution with the BN
  folded in (``fastres._cudnn``); CUDA tensors with cuDNN enabled.

``backend=None`` picks the first usable backend of the op's preference order
for the tensors' device (on CPU that is always ``"torch"``); on CUDA,
``conv_bn_act`` chooses per shape instead (``fastres.tune``).
"""
from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastres import _cudnn, _extension
from fastres._checks import BACKENDS, check_backend_name

_GPU_PREFERENCE = ("cuda", "triton", "cudnn", "torch")


def _triton_status() -> Tuple[Optional[str], Optional[str]]:
    """(triton version or None, why it cannot be imported or None)."""
    try:
        import triton
    except ImportError as e:
        return None, f"triton is not installed ({e})"
    return triton.__version__, None


TRITON_VERSION, _TRITON_ERROR = _triton_status()


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _version(v: str) -> Tuple[int, int]:
    major, minor = (int(p) for p in re.findall(r"\d+", v)[:2])
    return major, minor


def _interpreter_reason() -> Optional[str]:
    """Why the Triton interpreter cannot run the kernels here, or None.

    Triton 3.6's interpreter converts one-element arrays to Python scalars, which
    numpy 2.4 refuses (TypeError); 3.8's runs with it (the two tested tritons).
    """
    import numpy

    if _version(TRITON_VERSION) < (3, 8) and _version(numpy.__version__) >= (2, 4):
        return (
            f"the interpreter of triton {TRITON_VERSION} needs numpy < 2.4 (numpy {numpy.__version__} "
            "is installed); install numpy<2.4 or triton>=3.8"
        )
    return None


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    if backend == "torch":
        return None
    if backend == "triton":
        if _TRITON_ERROR is not None:
            return _TRITON_ERROR
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpret():
            return _interpreter_reason()
        return (
            f"triton kernels need CUDA tensors (got {device.type}); CPU tensors run only "
            "under the Triton interpreter (TRITON_INTERPRET=1 set before importing triton)"
        )
    if backend == "cuda":
        reason = _extension.unavailable_reason()
        if reason is not None:
            return reason
        if device.type != "cuda":
            return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
        return _extension.device_unavailable_reason(device)
    if backend == "cudnn":
        return _cudnn.unavailable_reason(device)
    raise AssertionError(backend)


def usable_backends(device: torch.device, implemented: Sequence[str] = BACKENDS) -> List[str]:
    """The backends among ``implemented`` that can run on ``device``, best first."""
    order = _GPU_PREFERENCE if device.type == "cuda" else ("torch",)
    return [b for b in order if b in implemented and unavailable_reason(b, device) is None]


def resolve(op: str, backend: Optional[str], device: torch.device, implemented: Sequence[str]) -> str:
    """The backend that runs ``op`` on ``device``; raises if ``backend`` cannot."""
    check_backend_name(op, backend)
    if backend is None:
        return usable_backends(device, implemented)[0]
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
    if backend not in implemented:
        raise RuntimeError(
            f"{op}: backend {backend!r} is not implemented for this op; implemented: "
            + ", ".join(repr(b) for b in implemented)
        )
    return backend


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def summary() -> Dict[str, Optional[str]]:
    """Each backend's availability on the default device: None if usable, else why not."""
    dev = default_device()
    return {b: unavailable_reason(b, dev) for b in BACKENDS}
