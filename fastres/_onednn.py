"""CPU inference path of the ``"torch"`` backend's ``conv_bn_act``: oneDNN's fused convolution.

PyTorch exposes oneDNN's convolution with post-ops as
``torch.ops.mkldnn._convolution_pointwise`` (the op TorchInductor's CPU backend
emits). Here the BN scale is folded into the weight in fp32 and the shift is
the bias, so one oneDNN call computes

    act(conv2d(x, weight * scale[k]) + shift[k] (+ residual))

which equals the reference's ``act(conv2d(x, weight) * scale[k] + shift[k] (+ residual))``
up to fp32 rounding. Used only for fp32 CPU tensors when no gradient is
needed: these ops have no autograd formula, and folding in a lower precision
would lose accuracy. silu after a residual add has no oneDNN post-op here and
takes the reference. Never under tracing (``fastres._tracing``) nor for tensor
subclasses (fake, functional...): these ops have no fake kernel and no
TorchScript or ONNX form, so a traced graph holds the reference's plain
``convolution``/``mul``/``add``/``relu`` instead.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres._tracing import is_tracing

_POST_OP = {"relu": "relu", "silu": "swish", "identity": "none"}
# After the residual add ("binary" post-op) oneDNN's PyTorch binding takes only relu or nothing.
_POST_BINARY_OP = {"relu": "relu", "identity": None}
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def applies(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], act: str) -> bool:
    """Whether this path computes ``conv_bn_act`` for these inputs."""
    if not _AVAILABLE or type(x) is not Tensor or x.device.type != "cpu" or x.dtype != torch.float32:
        return False
    if is_tracing():
        return False
    if residual is not None and act not in _POST_BINARY_OP:
        return False
    tensors = (x, weight, scale, shift) if residual is None else (x, weight, scale, shift, residual)
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def conv_bn_act(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, act: str,
) -> Tensor:
    w = weight * scale.view(-1, 1, 1, 1)
    args = (list(padding), list(stride), list(dilation), groups)
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(x, w, shift, *args, _POST_OP[act], [], "")
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, w, shift, *args, "add", None, _POST_BINARY_OP[act], [], None
    )
