"""CPU inference path of the ``"torch"`` backend's ``conv_bn_act`` for a 1x1 conv on few pixels:
one ``addmm``.

A 1x1, stride-1, ungrouped, unpadded conv is the matmul ``x[M, C] @ weight[K, C]^T`` over the
M = N*H*W pixels of a channels_last input. With the BN scale folded into the weight (fp32 math)
and the shift as the bias, ``act(addmm(shift, x, folded^T) (+ residual))`` is what oneDNN's fused
conv computes, in the same fp32 arithmetic. On few pixels (ResNet's layer3-4 at a small input)
oneDNN's packed 1x1 conv is slower than this matmul (fp32, 1 to 64 pixels, timed per shape on a
Xeon with AMX; the benchmark's 16x16 host-overhead rows show the effect on a whole model); with
a few hundred pixels oneDNN is faster, so this path takes at most :data:`MAX_PIXELS`. fp32 only:
in bf16 the two were about even at these sizes, and oneDNN keeps them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastres import _layout, reference
from fastres._tracing import is_tracing

# The most pixels (N*H*W) a conv may have for this path (see the module docstring).
MAX_PIXELS = 64


def unsupported_reason(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                       stride, padding, dilation, groups: int, act: str) -> Optional[str]:
    """Why this path does not compute ``conv_bn_act`` for these inputs, or None."""
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype != torch.float32:
        return "the 1x1 matmul path takes plain fp32 CPU tensors"
    if weight.shape[2:] != (1, 1) or tuple(stride) != (1, 1) or tuple(padding) != (0, 0) or groups != 1:
        return "not a 1x1, stride-1, unpadded, ungrouped conv"
    pixels = x.shape[0] * x.shape[2] * x.shape[3]
    if pixels == 0 or pixels > MAX_PIXELS:
        return f"{pixels} pixels (this path takes 1 to {MAX_PIXELS})"
    if not (_layout.conv_out_channels_last(x, weight) or x.shape[2] * x.shape[3] == 1):
        return "an NCHW output of more than one pixel per image"
    return eager_inference_reason(x, weight, scale, shift, residual)


def eager_inference_reason(*tensors: Optional[Tensor]) -> Optional[str]:
    """Why a CPU path that computes no gradient and is no traced op must not run on ``tensors``,
    or None."""
    if is_tracing():
        return "a traced graph holds the reference's ops"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return "it computes no gradient"
    return None


class Prepared(NamedTuple):
    """The folded weight as a ``[K, C]`` matrix and the shift, fp32, and F.conv2d's output format."""

    weight: Tensor
    bias: Tensor
    channels_last: bool

    def nbytes(self) -> int:
        return 4 * (self.weight.numel() + self.bias.numel())


def prepare(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor) -> Prepared:
    """The folded weight for inputs like ``x`` (its layout decides the output's, as for F.conv2d)."""
    folded = weight.float().reshape(weight.shape[0], weight.shape[1]) * scale.float().view(-1, 1)
    return Prepared(folded.contiguous(), shift.float().contiguous(), _layout.conv_out_channels_last(x, weight))


def run(p: Prepared, x: Tensor, residual: Optional[Tensor], act: str) -> Tensor:
    """``act(conv2d(x, folded) + shift (+ residual))`` with F.conv2d's output strides (channels_last,
    or NCHW for a one-pixel NCHW output: the same memory)."""
    n, c, h, w = x.shape
    k = p.weight.shape[0]
    rows = x.permute(0, 2, 3, 1).reshape(n * h * w, c)  # a view of a channels_last (or 1x1) input
    y = torch.addmm(p.bias, rows, p.weight.t())
    if residual is not None:
        y = reference.add_act(y, residual.permute(0, 2, 3, 1).reshape(n * h * w, k), act)
    else:
        y = reference.activation(y, act)
    out = y.view(n, h, w, k).permute(0, 3, 1, 2)
    if not p.channels_last:  # a one-pixel NCHW output: the same memory, NCHW strides
        out = out.as_strided(out.shape, (k, 1, 1, 1))
    return out
