"""CPU inference path of the ``"torch"`` backend's ``conv_bn_act`` for a small fp32 conv: ATen's own
``conv2d`` on the folded weight.

With the BN scale folded into the weight (fp32 math) and the shift as the bias,
``act(conv2d(x, folded, shift) (+ residual))`` is what oneDNN's fused conv computes. On a conv
of little work (ResNet's layer2-4 on a small input) a call is nearly all fixed cost, and
oneDNN's fused primitive costs more per call than ATen's ``conv2d``, which picks its own kernel
for such shapes (im2col and a matmul), adds the bias and leaves an in-place activation (fp32,
timed per ResNet shape on a Xeon with AMX, 2 threads, channels_last and NCHW inputs; the
benchmark's 16x16 host-overhead rows show the effect on a whole model). The bounds are where
oneDNN becomes the faster: :data:`MAX_MACS` multiply-adds and, for a conv larger than 1x1 (whose
im2col ATen rebuilds per call, and whose padding taps oneDNN skips on a one-pixel input),
:data:`MAX_WEIGHT` weight elements. The stem (C < 16: oneDNN's direct kernel is faster) and
grouped convs (not measured) keep oneDNN; fp32 only, as for the 1x1 matmul path
(``fastres._cpu_gemm``), which takes 1x1 stride-1 convs first.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from fastres import _conv, reference
from fastres._cpu_gemm import eager_inference_reason

# The most multiply-adds (N * P * Q * K * C * R * S) a conv may have for this path, the most
# weight elements (K * C * R * S) a conv larger than 1x1 may have, and the fewest input
# channels (see the module docstring).
MAX_MACS = 2_500_000
MAX_WEIGHT = 600_000
MIN_CHANNELS = 16


def unsupported_reason(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                       stride, padding, dilation, groups: int, act: str) -> Optional[str]:
    """Why this path does not compute ``conv_bn_act`` for these inputs, or None."""
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype != torch.float32:
        return "the small-conv path takes plain fp32 CPU tensors"
    if groups != 1 or x.shape[1] < MIN_CHANNELS:
        return f"a grouped conv or fewer than {MIN_CHANNELS} input channels (oneDNN is faster there)"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "an input neither NCHW nor channels_last"
    k, c, r, s = weight.shape
    macs = _conv.macs(x.shape, weight.shape, stride, padding, dilation)
    if macs == 0 or macs > MAX_MACS:
        return f"{macs} multiply-adds (this path takes 1 to {MAX_MACS})"
    if r * s > 1 and k * c * r * s > MAX_WEIGHT:
        return f"a {r}x{s} conv of {k * c * r * s} weight elements (this path takes at most {MAX_WEIGHT})"
    return eager_inference_reason(x, weight, scale, shift, residual)


class Prepared(NamedTuple):
    """The folded weight (fp32, in the memory format of F.conv2d's output) and the shift."""

    weight: Tensor
    bias: Tensor

    def nbytes(self) -> int:
        return 4 * (self.weight.numel() + self.bias.numel())


def prepare(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor) -> Prepared:
    """The folded weight for inputs like ``x``: in channels_last when ``F.conv2d(x, weight)``
    returns channels_last, so that ``conv2d(x, folded)`` returns the same format."""
    folded = weight.float() * scale.float().view(-1, 1, 1, 1)
    return Prepared(folded.contiguous(memory_format=_conv.out_format(x, weight)), shift.float().contiguous())


def run(p: Prepared, x: Tensor, residual: Optional[Tensor], act: str, stride, padding, dilation) -> Tensor:
    """``act(conv2d(x, folded, shift) (+ residual))`` with F.conv2d's output strides."""
    y = torch.conv2d(x, p.weight, p.bias, stride, padding, dilation)
    if residual is not None:
        return reference.add_act(y, residual, act)
    return reference.activation(y, act)
