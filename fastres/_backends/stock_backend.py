"""The ``"stock"`` backend of ``conv_bn_act``: PyTorch's convolution, then the best ``bn_act``
(two passes, no folding). Not a name users pass: it is what the per-shape tuner compares the
fused kernels with, and where the ``"cudnn"`` backend sends the epilogues cuDNN does not fuse."""
from __future__ import annotations

from typing import Callable

import torch.nn.functional as F

from fastres._backends.spec import Backend, Impl


def make(bn_act: Callable) -> Backend:
    """The backend, its second pass being ``bn_act(y, scale, shift, residual, act)`` (the registry's
    best backend for the tensors)."""

    def conv_then_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
        return bn_act(F.conv2d(x, weight, None, stride, padding, dilation, groups), scale, shift, residual, act)

    return Backend(
        name="stock",
        unavailable=lambda device: None,
        ops={"conv_bn_act": [Impl("conv-then-bn_act", conv_then_bn_act)]},
        tune=(3, 1),
        public=False,
    )
