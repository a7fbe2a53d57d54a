"""CPU inference path of the ``"torch"`` backend's ``conv_bn_act`` for a small bf16 conv on a CPU
where oneDNN has no bf16: ATen's ``conv2d`` in bf16, then fastres's ``bn_act``.

Where oneDNN computes bf16 only in fp32 (``fastres._onednn``: no AVX512-BF16/AMX, e.g. an
AMD EPYC with AVX2), its path reads an fp32 folded weight: twice the bytes of the model's own.
On a conv of little work (ResNet's layer2-4 on a small input) a call is nearly all weight traffic
and fixed cost, and stock ``F.conv2d`` in the 16-bit dtype, reading the 16-bit weight, is the
faster (ResNet-50 at 1x3x16x16 bf16 channels_last: torchvision 1.5x fastres's oneDNN path, AMD
EPYC with AVX2, 2 threads; the benchmark's host-overhead rows show it). So this path runs that
conv on the module's 16-bit weight (no bias), and ``act(y * scale + shift (+ residual))`` follows as
one ``bn_act`` in fp32, rounded once: the conv output is rounded to the dtype before the epilogue
(two roundings, as stock ``conv2d`` then BatchNorm). Above :data:`MAX_MACS` multiply-adds
oneDNN's fp32 path is the faster (ATen's 16-bit kernels without oneDNN are several times
slower at 224x224). bf16 only: fp16 (where oneDNN computes it in fp32 too) was not measured
faster this way, and keeps oneDNN's path.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fastres import _conv, _onednn
from fastres._cpu_gemm import eager_inference_reason

# The most multiply-adds (``_conv.macs``) a conv may have for this path.
MAX_MACS = 2_500_000


def unsupported_reason(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                       stride, padding, dilation, groups: int, act: str) -> Optional[str]:
    """Why this path does not compute ``conv_bn_act`` for these inputs, or None."""
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype != torch.bfloat16:
        return "the 16-bit conv path takes plain bf16 CPU tensors"
    if _onednn.compute_dtype(x.dtype) != torch.float32:
        return f"oneDNN does not compute {x.dtype} in fp32 here (it runs it natively, or is absent)"
    macs = _conv.macs(x.shape, weight.shape, stride, padding, dilation)
    if macs == 0 or macs > MAX_MACS:
        return f"{macs} multiply-adds (this path takes 1 to {MAX_MACS})"
    return eager_inference_reason(x, weight, scale, shift, residual)


def prepare(x: Tensor, weight: Tensor) -> Tensor:
    """The conv weight in ``x``'s dtype and in the memory format of F.conv2d's output (ATen's
    16-bit conv of a channels_last input on an NCHW 3x3 weight is ten times slower)."""
    return weight.to(x.dtype).contiguous(memory_format=_conv.out_format(x, weight))


def conv(weight: Tensor, x: Tensor, stride, padding, dilation, groups: int) -> Tensor:
    """``conv2d(x, weight)`` in ``x.dtype`` (the ``"torch"`` backend's CPU ``bn_act`` follows)."""
    return torch.conv2d(x, weight, None, stride, padding, dilation, groups)
