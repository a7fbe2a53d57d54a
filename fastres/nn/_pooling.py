"""Max pooling in training: keeping only its indices for backward, or after the ResNet stem's pending
BN-ReLU with the ReLU's backward on its output (``fastres.nn._train.relu_max_pool``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from fastres import _layout
from fastres._tracing import is_jit_or_fx_tracing
from fastres.nn._fusability import has_hooks
from fastres.nn._train import PendingBN, materialize, relu_max_pool


class _MaxPool2dIndices(torch.autograd.Function):
    """``F.max_pool2d(x, ...)`` that keeps only its indices for backward.

    Autograd's ``max_pool2d_with_indices`` keeps its input as well, though its
    backward reads only the input's shape and memory format: in a ResNet stem
    that input is the largest activation of the network (the stem's
    ``relu(bn1(conv1(x)))``, 4x the pooled output), kept for nothing when the
    stem unit itself does not keep it.

    ``forward`` takes ``ctx`` (no per-call signature binding in ``apply``) and the
    indices' gradient is not materialized (a zero int64 tensor of the output's size).
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode):
        out, indices = torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.args = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.memory_format = torch.channels_last if _layout.is_channels_last(x) else torch.contiguous_format
        return out, indices

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        if grad is None:
            return (None,) * 6
        (indices,) = ctx.saved_tensors
        # the input's shape and layout only, never read
        like = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device, memory_format=ctx.memory_format)
        return (torch.ops.aten.max_pool2d_with_indices_backward(grad, like, *ctx.args, indices),) + (None,) * 5


def max_pool(pool: nn.Module, x, backend: Optional[str]) -> Tensor:
    """``pool(x)``, ``x`` a tensor or a training unit's :class:`PendingBN`; in training, a plain
    ``nn.MaxPool2d`` runs as :class:`_MaxPool2dIndices`, or after a pending BN with ReLU with
    the ReLU's backward on its output (``fastres.nn._train.relu_max_pool``)."""
    plain = type(pool) is nn.MaxPool2d and not has_hooks(pool) and not pool.return_indices
    if isinstance(x, PendingBN):
        if plain and x.state.activation == "relu" and x.y.dim() == 4:
            return relu_max_pool(x, backend, *_pool_args(pool))
        x = materialize(x, backend)
    if not plain or is_jit_or_fx_tracing() or not torch.is_grad_enabled() or not x.requires_grad or x.dim() != 4:
        return pool(x)
    return _MaxPool2dIndices.apply(x, *_pool_args(pool))[0]


def _pool_args(pool: nn.MaxPool2d):
    """``(kernel_size, stride, padding, dilation, ceil_mode)`` of ``pool`` as pairs."""
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride = pool.kernel_size if pool.stride is None else pool.stride
    return pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(pool.dilation), pool.ceil_mode
