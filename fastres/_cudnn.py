"""The ``"cudnn"`` backend of ``conv_bn_act``: cuDNN's fused convolution with the BN folded in.

For the epilogues cuDNN fuses (through PyTorch: ``torch.cudnn_convolution_relu``
and ``torch.cudnn_convolution_add_relu``), the eval BN is folded into the conv:

    w' = round(weight * scale[k])        (product in fp32, fp64 stays fp64; rounded once to weight.dtype)
    b' = round(shift[k])                 (rounded to weight.dtype: cuDNN's bias has the data's dtype)
    y  = relu(conv2d(x, w') + b' (+ residual))   one cuDNN call, fp32 epilogue, one rounding

which equals the reference ``relu(conv2d(x, weight) * scale[k] + shift[k] (+ residual))``
up to the two roundings of the folding (``docs/cuda_conv.md``, "The cudnn
backend", says how far they move bf16 results). ``torch.cudnn_convolution_add_relu(x,
w, z, alpha, b, ...)`` computes ``relu(conv(x, w) + alpha * z + b)``; alpha is 1.

Every other epilogue (silu, identity, and fp64, which the fused cuDNN graph does
not take) runs on the ``"stock"`` backend: PyTorch's convolution (cuDNN on a GPU)
followed by the fused ``bn_act`` kernel, two passes, no folding, the reference's
math (``fastres/_backends/cudnn_backend.py``).

Folding is :func:`fold_bn`, the backend's prepared form: a module computes
``(w', b')`` once and calls :func:`conv_bias_relu` with it.
``fastres::conv_bias_relu_cudnn`` is a custom op (fake kernel, autograd), so
``torch.compile`` treats it as one opaque call and gradients flow through the
folding to ``weight``, ``scale`` and ``shift``. On CPU tensors the op computes
the same math in plain PyTorch (fp32 epilogue, one rounding): that is what the
CPU tests check; the ``"cudnn"`` backend name itself needs CUDA tensors.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from fastres import _conv, reference

# Epilogues cuDNN's fused convolution computes (activation, and the residual either way).
FUSED_ACTIVATIONS = ("relu",)
# Data types of cuDNN's fused conv graph (fp64 takes the conv + bn_act form).
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def fused_form(dtype: torch.dtype, activation: str) -> bool:
    """Whether the cudnn backend runs ``conv_bn_act`` as one fused cuDNN call (else conv + ``bn_act``)."""
    return activation in FUSED_ACTIVATIONS and dtype in FUSED_DTYPES


def fold_bn(weight: Tensor, scale: Tensor, shift: Tensor) -> Tuple[Tensor, Tensor]:
    """``(w', b')`` with ``conv2d(x, w') + b' == conv2d(x, weight) * scale[k] + shift[k]`` up to rounding.

    ``w' = weight * scale[k]`` is computed in fp32 (fp64 stays fp64) and rounded
    once to ``weight.dtype``, keeping ``weight``'s memory format; ``b' = shift``
    rounded to ``weight.dtype``. Differentiable in all three arguments.
    """
    ct = reference.compute_dtype(weight.dtype)
    s = scale.to(ct).view(-1, 1, 1, 1)
    if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (weight.requires_grad or scale.requires_grad)):
        w = (weight.to(ct) * s).to(weight.dtype)  # (dynamo refuses a strided out=; inductor fuses these)
    else:  # the same math in one kernel: computed in ct (type promotion), rounded once into out
        w = torch.mul(weight, s, out=torch.empty_like(weight))
    return w, shift.to(weight.dtype)


@torch.library.custom_op("fastres::conv_bias_relu_cudnn", mutates_args=())
def conv_bias_relu_cudnn(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
    stride: List[int], padding: List[int], dilation: List[int], groups: int,
) -> Tensor:
    """``relu(conv2d(x, weight) + bias[k] (+ residual))``: cuDNN's fused convolution on CUDA."""
    fmt = _conv.out_format(x, weight)
    if x.is_cuda:
        if residual is None:
            y = torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        else:
            y = torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)
    else:  # the same math, fp32 epilogue and one rounding, for the CPU tests
        ct = reference.compute_dtype(x.dtype)
        z = F.conv2d(x.to(ct), weight.to(ct), bias.to(ct), stride, padding, dilation, groups)
        if residual is not None:
            z = z + residual.to(ct)
        y = torch.relu(z).to(x.dtype)
    return y.contiguous(memory_format=fmt)


@conv_bias_relu_cudnn.register_fake
def _(x, weight, bias, residual, stride, padding, dilation, groups):
    return _conv.empty_output(x, weight, stride, padding, dilation)


def _setup(ctx, inputs, output):
    x, weight, bias, residual, stride, padding, dilation, groups = inputs
    ctx.save_for_backward(x, weight, output)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.has_residual = residual is not None


def _backward(ctx, grad):
    x, weight, y = ctx.saved_tensors
    stride, padding, dilation, groups = ctx.conv
    need = ctx.needs_input_grad
    # relu's gradient from its output, as torch.relu's own backward (NaN passes the gradient).
    gz = torch.ops.aten.threshold_backward(grad, y, 0)
    gx = gw = None
    if need[0] or need[1]:
        gx, gw, _ = _conv.backward(gz, x, weight, None, stride, padding, dilation, groups, [need[0], need[1], False])
    gb = gz.sum((0, 2, 3), dtype=reference.compute_dtype(gz.dtype)).to(weight.dtype) if need[2] else None
    gr = gz if ctx.has_residual and need[3] else None
    return gx, gw, gb, gr, None, None, None, None


conv_bias_relu_cudnn.register_autograd(_backward, setup_context=_setup)


def conv_bias_relu(
    x: Tensor, weight: Tensor, bias: Tensor, residual: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int,
) -> Tensor:
    """``relu(conv2d(x, weight) + bias (+ residual))`` with prepared (folded) ``weight`` and ``bias``."""
    return conv_bias_relu_cudnn(x, weight, bias, residual, list(stride), list(padding), list(dilation), groups)
