"""Plain PyTorch implementations of every fastres op: the ground truth.

These are what the ``"torch"`` backend runs and what every kernel is tested
against. Low-precision inputs are computed in float32 (float64 stays float64)
and cast once at the end, which is what the fused kernels do: the BN scale and
shift, the residual add and the activation all happen at full precision.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def activation(z: torch.Tensor, name: str) -> torch.Tensor:
    """Apply the named activation. ``relu`` propagates NaN exactly as ``torch.relu``."""
    if name == "relu":
        return torch.relu(z)
    if name == "silu":
        return F.silu(z)
    if name == "identity":
        return z
    raise ValueError(f"unknown activation {name!r}")


def _channel(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


def add_act(x: torch.Tensor, residual: torch.Tensor, act: str) -> torch.Tensor:
    """``act(x + residual)``, computed in fp32, cast once to ``x.dtype``."""
    ct = compute_dtype(x.dtype)
    return activation(x.to(ct) + residual.to(ct), act).to(x.dtype)


def bn_act(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: Optional[torch.Tensor],
    act: str,
) -> torch.Tensor:
    """``act(x * scale[c] + shift[c] (+ residual))`` over channel dim 1, in fp32."""
    ct = compute_dtype(x.dtype)
    z = x.to(ct) * _channel(scale.to(ct)) + _channel(shift.to(ct))
    if residual is not None:
        z = z + residual.to(ct)
    return activation(z, act).to(x.dtype)


def bn_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: Optional[torch.Tensor],
    act: str,
    residual_grad: bool,
    output: bool = False,
):
    """The backward of :func:`bn_act`: ``(grad_x, grad_z, grad_scale, grad_shift, y)``.

    ``grad_z = grad * act'(z)`` with PyTorch's own formulas (``threshold_backward``
    on the relu output, ``silu_backward``), ``grad_x = grad_z * scale[c]``, the
    channel sums of ``grad_z * x`` and ``grad_z`` (in scale's/shift's dtype),
    and ``y = bn_act(x, scale, shift, residual, act)``; ``grad_z`` and ``y``
    are empty tensors unless ``residual_grad`` and ``output``.
    """
    ct = compute_dtype(x.dtype)
    z = x.to(ct) * _channel(scale.to(ct)) + _channel(shift.to(ct))
    if residual is not None:
        z = z + residual.to(ct)
    y = activation(z, act)
    g = grad.to(ct)
    if act == "relu":
        gz = torch.ops.aten.threshold_backward(g, y, 0)
    elif act == "silu":
        gz = torch.ops.aten.silu_backward(g, z)
    else:
        gz = g
    dims = (0, 2, 3)
    grad_scale = (gz * x.to(ct)).sum(dims).to(scale.dtype)
    grad_shift = gz.sum(dims).to(shift.dtype)
    empty = x.new_empty(0)
    return (
        (gz * _channel(scale.to(ct))).to(x.dtype),
        gz.to(x.dtype) if residual_grad else empty,
        grad_scale,
        grad_shift,
        y.to(x.dtype) if output else empty,
    )


def conv_bn_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    residual: Optional[torch.Tensor],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
    groups: int,
    act: str,
) -> torch.Tensor:
    """``act(conv2d(x, weight) * scale[k] + shift[k] (+ residual))``, rounded once.

    fp16/bf16 operands are upcast to fp32 (exactly) and convolved in fp32, so
    the convolution is not rounded to ``x.dtype`` before the fp32 epilogue:
    the one rounding is the final cast, as in the fused kernels. (On a GPU the
    fp32 convolution may use TF32 when ``torch.backends.cudnn.allow_tf32`` is
    set, PyTorch's default; fp16/bf16 values are exact in TF32's 10-bit mantissa,
    so only the accumulation order differs.) The output's memory format is
    ``F.conv2d``'s for ``x`` and ``weight``.
    """
    ct = compute_dtype(x.dtype)
    y = F.conv2d(x.to(ct), weight.to(ct), None, stride, padding, dilation, groups)
    z = y * _channel(scale.to(ct)) + _channel(shift.to(ct))
    if residual is not None:
        z = z + residual.to(ct)
    return activation(z, act).to(x.dtype)


def bn_scale_shift(bn: torch.nn.modules.batchnorm._BatchNorm):
    """Eval-mode BatchNorm as ``x * scale + shift`` with fp32 ``scale``/``shift``.

    ``scale = weight / sqrt(running_var + eps)``, ``shift = bias - running_mean * scale``.
    Differentiable with respect to ``bn.weight`` and ``bn.bias``.
    """
    ct = torch.float64 if bn.running_var.dtype == torch.float64 else torch.float32
    scale = torch.rsqrt(bn.running_var.to(ct) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(ct)
    shift = -bn.running_mean.to(ct) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(ct)
    return scale, shift
