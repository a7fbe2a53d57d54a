"""The convolution problem of ``conv_bn_act``: output size, shape and memory format, its
multiply-adds, why a
call's shapes do not fit, and the convolution's backward. One source for the ops, their
fake kernels, ``fastres.nn`` and every backend."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from fastres import _layout


def out_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """One spatial output size of a convolution (``F.conv2d``'s formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def out_shape(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]) -> Tuple[int, int, int, int]:
    """``(N, K, P, Q)`` of ``conv2d(x, weight)``."""
    p, q = (out_size(x_shape[2 + i], w_shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2))
    return (x_shape[0], w_shape[0], p, q)


def macs(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int], padding: Sequence[int],
         dilation: Sequence[int]) -> int:
    """The multiply-adds of ``conv2d(x, weight)``: N * P * Q * K * C/groups * R * S."""
    n, k, p, q = out_shape(x_shape, w_shape, stride, padding, dilation)
    return n * p * q * k * w_shape[1] * w_shape[2] * w_shape[3]


def out_format(x: Tensor, weight: Tensor) -> torch.memory_format:
    """``F.conv2d``'s output memory format: channels_last when either operand is (``_layout``)."""
    return torch.channels_last if _layout.conv_out_channels_last(x, weight) else torch.contiguous_format


def empty_output(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int]) -> Tensor:
    """An uninitialized output of ``conv2d(x, weight)``: its shape, ``x``'s dtype, F.conv2d's format."""
    shape = out_shape(x.shape, weight.shape, stride, padding, dilation)
    return x.new_empty(shape).contiguous(memory_format=out_format(x, weight))


def mismatch(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
             groups: int) -> Optional[str]:
    """Why ``x`` and ``weight`` cannot form this convolution, or None.

    ``fastres._checks.check_conv_bn_act`` raises with the reason; ``fastres.nn``
    asks it to leave a misfitting call to the original modules' own errors.
    """
    k, cg = weight.shape[0], weight.shape[1]
    if x.shape[1] != cg * groups or k % groups != 0:
        return (f"expected `weight` of shape (K, C/groups, R, S) with K divisible by groups={groups} "
                f"and C/groups = {x.shape[1]}/{groups}; got weight {tuple(weight.shape)} for x {tuple(x.shape)}")
    if min(x.shape[1:]) < 1 or min(weight.shape) < 1:  # F.conv2d refuses these too
        return (f"expected `x` with non-zero C, H, W and a non-empty `weight`, got x {tuple(x.shape)} "
                f"and weight {tuple(weight.shape)}")
    out = out_shape(x.shape, weight.shape, stride, padding, dilation)
    if out[2] < 1 or out[3] < 1:
        return (f"the convolution output would be empty ({out}): input {tuple(x.shape)} is smaller "
                f"than the dilated kernel {tuple(weight.shape[2:])} with padding {tuple(padding)}")
    return None


def residual_mismatch(residual: Tensor, x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                      dilation: Sequence[int]) -> Optional[str]:
    """Why ``residual`` cannot be added to the output of ``conv2d(x, weight)``, or None."""
    out = out_shape(x.shape, weight.shape, stride, padding, dilation)
    if tuple(residual.shape) != out or residual.dtype != x.dtype:
        return (f"expected `residual` of the output's shape {out} and dtype {x.dtype}, "
                f"got {tuple(residual.shape)} {residual.dtype}")
    return None


def backward(grad: Tensor, x: Tensor, weight: Tensor, bias_sizes: Optional[List[int]], stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], groups: int, mask: Sequence[bool]):
    """``(grad_x, grad_weight, grad_bias)`` of ``conv2d(x, weight, bias)`` given the output's ``grad``;
    ``mask`` says which to compute (the others are None)."""
    return torch.ops.aten.convolution_backward(
        grad, x, weight, bias_sizes, list(stride), list(padding), list(dilation), False, [0, 0], groups, list(mask)
    )
