"""The ``"triton"`` backend: the Triton kernels (``fastres/triton/``); CUDA tensors, or CPU
tensors under the Triton interpreter (``TRITON_INTERPRET=1`` set before importing triton)."""
from __future__ import annotations

from typing import Optional

import torch

from fastres import _opdefs, _triton_env
from fastres._backends.spec import Backend, kernel_impl

if _triton_env.VERSION is not None:  # else the backend reports why it is missing
    import fastres.triton  # noqa: F401  (defines the torch.ops.fastres.*_triton ops)
    _OPS = _opdefs.register_kernel_ops("triton")
else:
    _OPS = {}


def unavailable_reason(device: torch.device) -> Optional[str]:
    if _triton_env.IMPORT_ERROR is not None:
        return _triton_env.IMPORT_ERROR
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _triton_env.interpret():
        return _triton_env.interpreter_reason()
    return (
        f"triton kernels need CUDA tensors (got {device.type}); CPU tensors run only "
        "under the Triton interpreter (TRITON_INTERPRET=1 set before importing triton)"
    )


BACKEND = Backend(
    name="triton",
    unavailable=unavailable_reason,
    ops={op: [kernel_impl("triton", fn, family=op)] for op, fn in _OPS.items()},
    preference={"cuda": 1},
    tune=(2, 3),  # autotunes on its first call: timed last
)
