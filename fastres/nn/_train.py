"""Training units: conv -> BN with batch statistics (-> + residual) -> activation.

One autograd function per unit (:class:`_ConvBatchStats`): ``F.conv2d``, the conv
output ``yc`` centered on its detached batch mean (for an fp32-accurate backward),
its biased variance and mean in fp32 (BatchNorm's statistics kernel,
:func:`_batch_var_mean`); then ``scale = weight * rstd``, ``shift = bias - mean *
scale`` and one ``fastres.ops.bn_act`` for normalize + residual + activation. The
gradients are exactly ``nn.BatchNorm2d``'s, and so is the running-statistics update.

Memory: a unit whose output only feeds the next unit's conv (``defer=True``)
returns a :class:`PendingBN`; the next unit applies it inside its own autograd
function, so the activation is never saved but recomputed in the fused
``bn_act`` backward (``output=True``) for the conv's weight gradient. Each unit
keeps its ``yc``. ``memory="min"`` (``fastres.set_training_memory``) runs a
block's last unit and the downsample as :class:`_ConvBNActRecompute`, which keeps
no ``yc`` and recomputes the conv in the backward. docs/models.md has the byte counts.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import _conv, ops, reference
from fastres.nn._casting import cast
from fastres.nn._fusability import conv_geometry


class PendingBN:
    """A training unit's ``act(yc * scale[c] + shift[c])``, not applied yet.

    A training unit (:func:`conv_bn_act` with ``defer=True``) whose output only
    feeds the next unit's conv returns this instead of the activation: the next
    unit applies it inside its own autograd function (:class:`_ConvBatchStats`),
    which keeps ``yc`` for backward instead of the activation and gets the
    activation back from the fused ``bn_act`` backward for its weight
    gradient. ``yc`` is kept anyway (it is what this unit's BN backward needs),
    so the unit costs one full-size activation instead of two.
    """

    __slots__ = ("yc", "scale", "shift", "activation")

    def __init__(self, yc: Tensor, scale: Tensor, shift: Tensor, activation: str) -> None:
        self.yc, self.scale, self.shift, self.activation = yc, scale, shift, activation

    def materialize(self, backend: Optional[str]) -> Tensor:
        return ops.bn_act(self.yc, self.scale, self.shift, None, self.activation, backend=backend)


def materialize(x, backend: Optional[str]) -> Tensor:
    """``x`` as a tensor (a :class:`PendingBN` applied)."""
    return x.materialize(backend) if isinstance(x, PendingBN) else x


class _ConvBatchStats(torch.autograd.Function):
    """One training unit's conv and batch statistics: ``(yc, var, mean_c, center)``.

    Forward, with ``a = src`` or, when the input is the previous unit's pending
    BN, ``a = bn_act(src, scale_prev, shift_prev, act_prev)``::

        y = conv2d(a, weight, bias)
        center = mean(y) over (N, H, W), detached, in y's dtype
        yc = y - center
        var, mean_c = biased variance and mean of yc (fp32; fp64 for fp64)

    ``center`` is ``y``'s batch mean rounded to ``y``'s dtype, so ``mean_c ~ 0``:
    the BN backward then reduces ``sum(grad * yc)``, not ``sum(grad * y) - mean
    * sum(grad)``, which cancels catastrophically in fp32 for channels whose
    mean is large against their standard deviation (``nn.BatchNorm2d``'s
    backward reduces ``grad * (y - mean)`` directly).

    Saved for backward: ``src``, ``yc`` and per-channel vectors. ``src`` is the
    previous unit's ``yc`` (saved by that unit anyway) or the block input (saved
    by every consumer of it anyway), so a unit adds one full-size tensor,
    ``yc``: the activation ``a`` is not kept but recomputed inside the fused
    ``bn_act`` backward, which returns it with the previous unit's gradients in
    the same pass (``output=True``), for this conv's weight gradient. The
    gradient is exactly autograd's through ``F.conv2d``, ``y - center`` and
    ``torch.var_mean(..., correction=0)``.
    """

    @staticmethod
    def forward(src, scale_prev, shift_prev, weight, bias, conv_args, act_prev, backend, low):
        return _conv_stats(src, scale_prev, shift_prev, weight, bias, conv_args, act_prev, backend, low)[1:]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        src, scale_prev, shift_prev, weight, bias, conv_args, act_prev, backend, low = inputs
        yc, _, mean_c, center = output
        ctx.mark_non_differentiable(center)
        ctx.save_for_backward(src, scale_prev, shift_prev, weight, yc, mean_c)
        _save_conv(ctx, conv_args, act_prev, backend, low, bias)

    @staticmethod
    def backward(ctx, grad_yc, grad_var, grad_mean, _grad_center):
        src, scale_prev, shift_prev, weight, yc, mean_c = ctx.saved_tensors
        dy = _stats_backward(yc, mean_c, grad_yc, grad_var, grad_mean)
        return _conv_backward(ctx, dy, src, scale_prev, shift_prev, weight, None, ctx.needs_input_grad[:5]) + (
            None, None, None, None,
        )


def _save_conv(ctx, conv_args, act_prev, backend, low, bias) -> None:
    """What :func:`_conv_backward` reads from ``ctx`` besides the saved tensors."""
    ctx.conv_args, ctx.act_prev, ctx.backend, ctx.low = conv_args, act_prev, backend, low
    ctx.bias_sizes = None if bias is None else list(bias.shape)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv_backward(ctx, dy, src, scale_prev, shift_prev, weight, a, need):
    """Gradients ``(src, scale_prev, shift_prev, weight, bias)`` of ``conv2d(a, weight, bias)``
    with ``a = src`` or ``a = bn_act(src, scale_prev, shift_prev, act_prev)``, given ``dy``.

    ``a`` is the recomputed activation if the caller has it, else None: then
    the fused ``bn_act`` backward recomputes it (``output=True``) in the pass
    that computes the previous unit's gradients, after the conv's input
    gradient and before its weight gradient. ``weight`` is the parameter: under
    autocast its low-precision copy is made again here rather than kept from
    the forward (autograd through ``F.conv2d`` keeps it: a model's size of
    extra memory in bf16 training).
    """
    w = cast(weight, ctx.low)
    conv_bwd = lambda inp, mask: _conv.backward(dy, inp, w, ctx.bias_sizes, *ctx.conv_args, mask)  # noqa: E731
    grad_src = grad_scale = grad_shift = grad_w = grad_b = None
    need_prev = need[0] or need[1] or need[2]
    if scale_prev is None:  # the input is the activation itself
        grad_src, grad_w, grad_b = conv_bwd(src, [need[0], need[3], need[4]])
    elif a is not None:
        grad_a, grad_w, grad_b = conv_bwd(a, [need_prev, need[3], need[4]])
        if need_prev:
            grad_src, _, grad_scale, grad_shift, _ = ops.bn_act_backward(
                grad_a, src, scale_prev, shift_prev, None, ctx.act_prev, False, backend=ctx.backend
            )
    else:
        if need_prev:
            # The conv's input gradient only needs the input's shape and layout: those of src.
            grad_a, _, grad_b = conv_bwd(src, [True, False, need[4]])
            grad_src, _, grad_scale, grad_shift, a = ops.bn_act_backward(
                grad_a, src, scale_prev, shift_prev, None, ctx.act_prev, False, need[3], backend=ctx.backend
            )
        elif need[3]:
            a = ops.bn_act(src, scale_prev, shift_prev, None, ctx.act_prev, backend=ctx.backend)
        if need[3] or (need[4] and grad_b is None):
            _, grad_w, gb = conv_bwd(src if a is None else a, [False, need[3], need[4] and grad_b is None])
            grad_b = gb if grad_b is None else grad_b
    return (
        grad_src if need[0] else None,
        grad_scale if need[1] else None,
        grad_shift if need[2] else None,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(ctx.bias_dtype),
    )


def _stats_backward(yc: Tensor, mean_c: Tensor, grad_yc: Optional[Tensor], grad_var, grad_mean) -> Tensor:
    """The gradient of ``y`` (= that of ``yc``) given those of ``yc`` and of
    ``torch.var_mean(yc, (0, 2, 3), correction=0)``, rounded once to ``yc``'s dtype.

    ``var_mean``'s backward is ``grad_mean / n + 2 * grad_var / n * (yc - mean_c)``,
    i.e. ``a[c] + b[c] * yc``: one ``addcmul`` pass over ``yc``.
    """
    n = yc.numel() // yc.shape[1]
    ct = mean_c.dtype
    a = torch.zeros_like(mean_c) if grad_mean is None else grad_mean / n
    b = torch.zeros_like(mean_c) if grad_var is None else grad_var * (2.0 / n)
    a = (a - b * mean_c).view(1, -1, 1, 1)
    base = a.expand(yc.shape) if grad_yc is None else grad_yc.to(ct) + a
    return torch.addcmul(base, yc.to(ct), b.view(1, -1, 1, 1)).to(yc.dtype)


def _conv_stats(src, scale_prev, shift_prev, weight, bias, conv_args, act_prev, backend, low):
    """``(a, yc, var, mean_c, center)`` of :class:`_ConvBatchStats`'s forward."""
    a = src if scale_prev is None else ops.bn_act(src, scale_prev, shift_prev, None, act_prev, backend=backend)
    y = F.conv2d(a, cast(weight, low), cast(bias, low), *conv_args)
    center = _batch_var_mean(y.detach())[1].to(y.dtype)
    yc = y - center.view(1, -1, 1, 1)
    var, mean_c = _batch_var_mean(yc)
    return a, yc, var, mean_c, center


def _batch_var_mean(t: Tensor) -> Tuple[Tensor, Tensor]:
    """``torch.var_mean(t, (0, 2, 3), correction=0)`` in fp32 (fp64 for fp64).

    Outside autograd (inside the units' autograd functions) this is
    ``torch.batch_norm_update_stats``, BatchNorm's own statistics kernel (one
    pass, any memory format; on the CPU several times faster than ``var_mean``
    over ``(0, 2, 3)``); given running buffers of the compute dtype it returns the
    statistics in that dtype, also for a bf16/fp16 ``t``, and with momentum 0
    leaves the buffers as they are. Under ``torch.compile`` (where the units
    run as plain differentiable ops) it is ``torch.var_mean``, which the
    compiler fuses and differentiates.
    """
    ct = reference.compute_dtype(t.dtype)
    if torch.compiler.is_compiling():
        return torch.var_mean(t.to(ct), dim=(0, 2, 3), correction=0)
    c = t.shape[1]
    mean, var = torch.batch_norm_update_stats(
        t, t.new_zeros(c, dtype=ct), t.new_ones(c, dtype=ct), 0.0
    )
    return var, mean


def _scale_shift(var: Tensor, mean_c: Tensor, eps: float, weight: Optional[Tensor], bias: Optional[Tensor]):
    """BN with batch statistics as ``(rstd, scale, shift)``: ``bn(y) = yc * scale + shift``."""
    ct = mean_c.dtype
    rstd = torch.rsqrt(var + eps)
    scale = rstd if weight is None else rstd * weight.to(ct)
    shift = -mean_c * scale
    if bias is not None:
        shift = shift + bias.to(ct)
    return rstd, scale, shift


class _ConvBNActRecompute(torch.autograd.Function):
    """A block's last training unit, ``act(bn(conv2d(a, weight, bias)) + residual)``, that
    keeps no full-size tensor of its own: ``training_memory="min"``.

    ``a`` and the batch statistics are as in :class:`_ConvBatchStats`. Saved:
    ``src`` (the previous unit's ``yc`` or the input, kept anyway), the
    per-channel statistics and, with a residual, for ReLU the output itself
    (the next conv keeps it anyway; ReLU's backward reads its output, as
    ``torch.relu``'s does), for SiLU the residual (identity needs neither). The backward recomputes
    ``a``, the conv and ``yc`` (bit-identical: the same ops on the same
    values), then runs the BN backward by hand (autograd's formulas for
    ``rsqrt``, the products and ``var_mean``) and the conv backward.
    Outputs ``(out, var, mean_c, center)``; the statistics only feed the
    running-statistics update and carry no gradient.
    """

    @staticmethod
    def forward(src, scale_prev, shift_prev, weight, bias, bn_weight, bn_bias, residual, conv_args, act_prev, act,
                eps, backend, low, update_stats):
        _, yc, var, mean_c, center = _conv_stats(src, scale_prev, shift_prev, weight, bias, conv_args, act_prev,
                                                 backend, low)
        if update_stats is not None:
            update_stats(var, mean_c, center)
        _, scale, shift = _scale_shift(var, mean_c, eps, bn_weight, bn_bias)
        out = ops.bn_act(yc, scale, shift, residual, act, backend=backend)
        return out, var, mean_c, center

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (src, scale_prev, shift_prev, weight, bias, bn_weight, bn_bias, residual, conv_args, act_prev, act, eps,
         backend, low, _) = inputs
        out, var, mean_c, center = output
        ctx.mark_non_differentiable(var, mean_c, center)
        # act'(z) needs z = yc * scale + shift + residual; without residual yc gives it.
        keep_out = act == "relu" and residual is not None
        keep_residual = act == "silu" and residual is not None
        ctx.save_for_backward(
            src, scale_prev, shift_prev, weight, bias, bn_weight, bn_bias, var, mean_c, center,
            residual if keep_residual else None, out if keep_out else None,
        )
        _save_conv(ctx, conv_args, act_prev, backend, low, bias)
        ctx.act, ctx.eps = act, eps
        ctx.has_residual = residual is not None

    @staticmethod
    def backward(ctx, grad_out, _gv, _gm, _gc):
        (src, scale_prev, shift_prev, weight, bias, bn_weight, bn_bias, var, mean_c, center, residual,
         out) = ctx.saved_tensors
        need = ctx.needs_input_grad
        # The forward's a and yc again (the same ops on the same values, and the saved center).
        a = src if scale_prev is None else ops.bn_act(src, scale_prev, shift_prev, None, ctx.act_prev,
                                                       backend=ctx.backend)
        yc = F.conv2d(a, cast(weight, ctx.low), cast(bias, ctx.low), *ctx.conv_args) - center.view(1, -1, 1, 1)
        rstd, scale, shift = _scale_shift(var, mean_c, ctx.eps, bn_weight, bn_bias)
        need_res = ctx.has_residual and need[7]
        if out is not None:  # relu with a residual
            gz = torch.ops.aten.threshold_backward(grad_out, out, 0)
            grad_yc, _, gs, gb, _ = ops.bn_act_backward(gz, yc, scale, shift, None, "identity", False,
                                                        backend=ctx.backend)
            grad_res = gz if need_res else None
        else:
            grad_yc, gz, gs, gb, _ = ops.bn_act_backward(grad_out, yc, scale, shift, residual, ctx.act,
                                                         need_res and residual is not None, backend=ctx.backend)
            grad_res = None if not need_res else gz if residual is not None else grad_out
        # shift = bias - mean_c * scale, scale = weight * rstd, rstd = rsqrt(var + eps)
        grad_bn_bias = gb if need[6] else None
        g_scale = gs - gb * mean_c
        grad_mean = -gb * scale
        grad_bn_weight = g_scale * rstd if need[5] else None
        g_rstd = g_scale if bn_weight is None else g_scale * bn_weight.to(g_scale.dtype)
        grad_var = g_rstd * (-0.5 * rstd.pow(3))
        dy = _stats_backward(yc, mean_c, grad_yc, grad_var, grad_mean)
        del yc
        grads = _conv_backward(ctx, dy, src, scale_prev, shift_prev, weight, a, need[:5])
        return grads + (
            None if grad_bn_weight is None else grad_bn_weight.to(bn_weight.dtype),
            None if grad_bn_bias is None else grad_bn_bias.to(bn_bias.dtype),
            grad_res, None, None, None, None, None, None, None,
        )


def train_unit(
    x, conv: nn.Conv2d, bn: _BatchNorm, fused_act: str, after: Optional[nn.Module], residual: Optional[Tensor],
    backend: Optional[str], low: Optional[torch.dtype], defer: bool, memory: str,
):
    """A conv -> BN (batch statistics) -> act (+ residual) unit in training (module docstring);
    ``fused_act``, ``after``: the epilogue's activation and the module run after it (``fastres.nn._fusability.epilogue``)."""
    if isinstance(x, PendingBN):
        src, scale_prev, shift_prev, act_prev = x.yc, x.scale, x.shift, x.activation
    else:
        src, scale_prev, shift_prev, act_prev = cast(x, low), None, None, "identity"
    weight, bias = conv.weight, conv.bias  # cast to low inside the units (:func:`_conv_backward`)
    conv_args = conv_geometry(conv)
    deferred = defer and residual is None and after is None
    n = _values_per_channel(src, weight, conv_args)
    update = lambda var, mean_c, center: _update_running_stats(bn, var, mean_c, center, n)  # noqa: E731
    # Under torch.compile the unit runs as plain differentiable ops: the compiler's partitioner
    # chooses what to keep for backward itself (recomputing cheap ops), and torch 2.11's AOT
    # autograd computes wrong gradients through these autograd functions (tests/test_training_memory.py).
    compiling = torch.compiler.is_compiling()
    if memory == "min" and not deferred and not compiling:
        # The running statistics are updated inside the function's forward, before it saves
        # anything: torch.utils.checkpoint's recomputation stops once the last tensor of the
        # region is saved again, and this unit may save it (torchvision's BN updates its
        # statistics before its ReLU saves).
        residual = cast(residual, src.dtype if low is not None else None)
        out, var, mean_c, center = _ConvBNActRecompute.apply(
            src, scale_prev, shift_prev, weight, bias, bn.weight, bn.bias, residual, conv_args, act_prev,
            fused_act, bn.eps, backend, low, update,
        )
        return out if after is None else after(out)
    if compiling:
        yc, var, mean_c, center = _conv_stats(src, scale_prev, shift_prev, weight, bias, conv_args, act_prev,
                                              backend, low)[1:]
    else:
        yc, var, mean_c, center = _ConvBatchStats.apply(
            src, scale_prev, shift_prev, weight, bias, conv_args, act_prev, backend, low
        )
    update(var, mean_c, center)
    _, scale, shift = _scale_shift(var, mean_c, bn.eps, bn.weight, bn.bias)
    if deferred:
        return PendingBN(yc, scale, shift, fused_act)
    residual = cast(residual, yc.dtype if low is not None else None)
    out = ops.bn_act(yc, scale, shift, residual, fused_act, backend=backend)
    return out if after is None else after(out)


def _values_per_channel(src: Tensor, weight: Tensor, conv_args) -> int:
    """``N * H_out * W_out`` of the conv; ``nn.BatchNorm2d``'s error if it is 1 or less."""
    out = _conv.out_shape(src.shape, weight.shape, *conv_args[:3])
    n = out[0] * out[2] * out[3]
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(out)}")
    return n



def _update_running_stats(bn: _BatchNorm, var: Tensor, mean_c: Tensor, center: Tensor, n: int) -> None:
    """``nn.BatchNorm2d``'s running-statistics update (``torch/nn/modules/batchnorm.py``)
    from the biased ``var`` and the mean ``mean_c + center`` of ``n`` values per
    channel, if ``bn`` tracks them."""
    if not (bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None):
        return
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average; a tensor, so no host sync
                factor = 1.0 / bn.num_batches_tracked.to(torch.float64)
        unbiased = var * (n / (n - 1))
        mean = mean_c + center.to(mean_c.dtype)
        for buf, stat in ((bn.running_mean, mean), (bn.running_var, unbiased)):
            buf.copy_(stat * factor + buf * (1 - factor))
