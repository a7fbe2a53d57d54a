"""Memory-format rules shared by every kernel and its fake.

Kernels handle exactly two dense layouts: contiguous (NCHW) and channels_last
(NHWC). Anything else is copied into the layout PyTorch would suggest for it,
and outputs are allocated like the (normalized) input, so the output memory
format follows the input as it does for ``F.conv2d`` and elementwise ops.
"""
from __future__ import annotations

import torch
from torch._prims_common import suggest_memory_format


def is_channels_last(t: torch.Tensor) -> bool:
    """True when ``t`` is stored NHWC and not (also) NCHW-contiguous.

    A tensor that is both (C == 1 or H * W == 1) indexes the same either way.
    """
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def dense(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is NCHW- or NHWC-contiguous, else a copy in the suggested format."""
    if t.is_contiguous() or is_channels_last(t):
        return t
    return t.contiguous(memory_format=suggest_memory_format(t))


def like(t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """``t`` with exactly ``ref``'s strides (``ref`` dense), copying only if needed."""
    if t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def suggests_channels_last(t: torch.Tensor) -> bool:
    """``suggest_memory_format(t) == torch.channels_last``, without its Python stride analysis
    for the common case of a tensor dense in exactly one of the two layouts."""
    nchw, nhwc = t.is_contiguous(), t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
    if nchw != nhwc:
        return nhwc
    return suggest_memory_format(t) == torch.channels_last


def conv_out_channels_last(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.conv2d(x, weight)`` returns channels_last: when either operand is.

    "Is" in PyTorch's sense (``cudnn_conv_suggest_memory_format``, and the CPU
    backends alike): ``suggest_memory_format``, which also calls channels_last
    a tensor that is both NCHW- and NHWC-contiguous but has NHWC strides, such
    as a channels_last 1x1 weight ``(K, C, 1, 1)`` or a C == 1 input; the
    output of such a conv is channels_last (csrc/cuda/conv_bn_act.cu follows
    the same rule).
    """
    return suggests_channels_last(x) or suggests_channels_last(weight)

