"""The ``"cuda"`` backend: the compiled CUDA C++ kernels of ``fastres._C``; CUDA tensors of a
GPU whose architecture they were compiled for (``fastres._extension``). Its conv takes the
shapes of one C++ rule (``_extension.cuda_conv_unsupported_reason``, docs/cuda_conv.md)."""
from __future__ import annotations

from typing import Optional

import torch

from fastres import _extension, _opdefs
from fastres._backends.spec import Backend, kernel_impl

_OPS = _opdefs.register_kernel_ops("cuda") if _extension.LOADED else {}


def unavailable_reason(device: torch.device) -> Optional[str]:
    reason = _extension.unavailable_reason()
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    return _extension.device_unavailable_reason(device)


def _conv_reason(x, weight, scale, shift, residual, stride, padding, dilation, groups, act) -> Optional[str]:
    return _extension.cuda_conv_unsupported_reason(x, weight, stride, padding, dilation, groups)


BACKEND = Backend(
    name="cuda",
    unavailable=unavailable_reason,
    ops={op: [kernel_impl("cuda", fn, _conv_reason if op == "conv_bn_act" else None, family=op)]
         for op, fn in _OPS.items()},
    preference={"cuda": 0},
    tune=(1, 2),
)
