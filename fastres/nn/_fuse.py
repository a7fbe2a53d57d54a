"""How a fastres module runs ``conv -> BN (-> + residual) -> activation``.

One function, :func:`conv_bn_act`, decides per call, from the submodules it is
given, what can run fused and what must run as the original modules:

* **BN with running statistics** (``bn.eval()``, the usual inference case, or
  frozen-BN fine-tuning): one ``fastres.ops.conv_bn_act`` with the BN folded
  into a per-channel fp32 ``scale``/``shift`` (``fastres.ops.bn_scale_shift``,
  plus ``scale * conv.bias`` when the conv has a bias) and the residual and
  activation in the epilogue.
* **BN with batch statistics** (``bn.train()``, or ``track_running_stats=False``):
  one autograd function per unit (:class:`_ConvBatchStats`): ``F.conv2d``,
  the conv output ``yc`` centered on its detached batch mean (for an
  fp32-accurate backward), its biased variance and mean in fp32
  (BatchNorm's statistics kernel, :func:`_batch_var_mean`); then ``scale = weight * rstd``,
  ``shift = bias - mean * scale`` and one ``fastres.ops.bn_act`` for
  normalize + residual + activation. The gradients are exactly
  ``nn.BatchNorm2d``'s. Running statistics are updated as ``nn.BatchNorm2d``
  does (momentum, ``momentum=None`` as a cumulative average, unbiased
  variance, ``num_batches_tracked``), under ``no_grad``.

  Memory: a unit whose output only feeds the next unit's conv (``defer=True``)
  returns a :class:`PendingBN` instead of its activation; the next unit
  applies it inside its own autograd function, so the activation is never
  saved: the backward recomputes it in the fused ``bn_act`` backward
  (``output=True``) for the conv's weight gradient. Each unit keeps its ``yc``
  (which its BN backward needs anyway: not the activation, because BN's input
  gradient needs the normalized value everywhere, also where ReLU's gradient
  is zero, and ReLU is not invertible). ``memory="min"``
  (``fastres.set_training_memory``) runs the other units (a block's last, the
  downsample) as :class:`_ConvBNActRecompute`, which keeps no ``yc`` and
  recomputes the conv in the backward.
* **Frozen BN** (torchvision's ``FrozenBatchNorm2d``, timm's
  ``FrozenBatchNormAct2d``): fixed statistics, fused as above in eval and in
  train mode. timm's ``BatchNormAct2d`` is a ``BatchNorm2d`` whose own
  activation joins the epilogue (:func:`library_norms`, :func:`epilogue`).
* **Anything else** (a conv that is not a plain zero-padded ``nn.Conv2d``, a norm
  not listed above, a training ``SyncBatchNorm``, modules with hooks, a norm
  activation before a residual add): the original modules,
  ``act(bn(conv(x)) + residual)``, exactly as torchvision runs them. An
  activation module other than ``nn.ReLU``, ``nn.SiLU`` or ``nn.Identity`` is
  applied after a fused ``"identity"`` epilogue.

Eval mode prepares once what it derives from the parameters (BN
``scale``/``shift``; on CPU the BN-folded oneDNN weight, prepacked; the
kernels' weight layout and autocast copy) and caches it on the owning module
(see :class:`PreparedCache`).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import _layout, _onednn, ops
from fastres._checks import check_activation
from fastres._tracing import is_jit_or_fx_tracing, is_tracing

_ACTIVATION_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu", nn.Identity: "identity"}
_ACTIVATION_FACTORIES = {
    "relu": lambda: nn.ReLU(inplace=True),
    "silu": lambda: nn.SiLU(inplace=True),
    "identity": nn.Identity,
}


def make_activation(name: str, op: str = "fastres.nn") -> nn.Module:
    """The module for a fused activation name: ``nn.ReLU``, ``nn.SiLU`` or ``nn.Identity``."""
    check_activation(op, name)
    return _ACTIVATION_FACTORIES[name]()


def _has_hooks(m: nn.Module) -> bool:
    return bool(
        m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
    )


def activation_name(module: Optional[nn.Module]) -> Optional[str]:
    """The fused activation that ``module`` computes, or None if it must run as a module.

    Only the exact types ``nn.ReLU``, ``nn.SiLU`` and ``nn.Identity`` (without
    hooks) map; subclasses may compute something else.
    """
    if module is None:
        return "identity"
    name = _ACTIVATION_MODULES.get(type(module))
    if name is None or _has_hooks(module):
        return None
    return name


def activation_unfusable_reason(module: Optional[nn.Module]) -> Optional[str]:
    if activation_name(module) is not None:
        return None
    if type(module) in _ACTIVATION_MODULES:
        return f"activation {type(module).__name__} has hooks"
    return (
        f"activation {type(module).__name__} is not one of nn.ReLU, nn.SiLU, nn.Identity "
        "(the fused activations)"
    )


def conv_unfusable_reason(conv: nn.Module) -> Optional[str]:
    """Why ``conv`` cannot be the convolution of a fused op, or None if it can."""
    if not isinstance(conv, nn.Conv2d) or type(conv).forward is not nn.Conv2d.forward:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if isinstance(conv, nn.modules.lazy.LazyModuleMixin):
        return f"{type(conv).__name__} is not initialized yet"
    if type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return f"{type(conv).__name__} overrides _conv_forward"
    if conv.padding_mode != "zeros":
        return f"conv padding_mode={conv.padding_mode!r} (only 'zeros' is fused)"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return f"conv padding={conv.padding!r} (only explicit padding and 'valid' are fused)"
    if _has_hooks(conv):
        return "the conv has hooks"
    return None


def library_norms() -> Tuple[type, ...]:
    """The norm layers of torchvision and timm (those already imported) fused besides ``nn.BatchNorm2d``.

    * ``torchvision.ops.misc.FrozenBatchNorm2d``: fixed ``weight``, ``bias``,
      ``running_mean``, ``running_var`` buffers and its own ``eps``; never batch
      statistics, in train mode too.
    * timm's ``BatchNormAct2d`` (an ``nn.BatchNorm2d``, then its ``drop`` and
      ``act`` submodules) and ``FrozenBatchNormAct2d`` (the frozen BN, then
      ``drop`` and ``act``): fused when ``drop`` is ``nn.Identity`` and ``act`` a
      fused activation, which then joins the epilogue (see :func:`epilogue`).
    """
    out = []
    tv = sys.modules.get("torchvision.ops.misc")
    if tv is not None and hasattr(tv, "FrozenBatchNorm2d"):
        out.append(tv.FrozenBatchNorm2d)
    timm = sys.modules.get("timm.layers.norm_act")
    if timm is not None:
        out += [getattr(timm, n) for n in ("BatchNormAct2d", "FrozenBatchNormAct2d") if hasattr(timm, n)]
    return tuple(out)


def bn_unfusable_reason(bn: nn.Module, *, runtime: bool = False) -> Optional[str]:
    """Why ``bn`` cannot be folded into a fused op, or None if it can.

    Fused: ``nn.BatchNorm2d``, ``nn.SyncBatchNorm`` and :func:`library_norms`
    (exact classes: a subclass may compute something else). ``runtime=True``
    also rejects a ``SyncBatchNorm`` that would use batch statistics now (it
    synchronizes them across processes; it runs as itself).
    """
    if isinstance(bn, nn.SyncBatchNorm):
        if type(bn).forward is not nn.SyncBatchNorm.forward:
            return f"{type(bn).__name__} overrides forward"
        if runtime and uses_batch_stats(bn):
            return "a training SyncBatchNorm synchronizes batch statistics across processes"
    elif isinstance(bn, nn.BatchNorm2d) and type(bn).forward is _BatchNorm.forward:
        pass
    elif type(bn) in library_norms():
        if "act" in bn._modules:  # timm's norm + activation layers
            name = type(bn).__name__
            if type(bn.drop) is not nn.Identity or _has_hooks(bn.drop):
                return f"{name}.drop is {type(bn.drop).__name__} (only nn.Identity without hooks is fused)"
            why = activation_unfusable_reason(bn.act)
            if why:
                return f"{name}.act: {why}"
    else:
        return (
            f"{type(bn).__name__} is not an nn.BatchNorm2d, SyncBatchNorm, torchvision FrozenBatchNorm2d "
            "or timm BatchNormAct2d/FrozenBatchNormAct2d"
        )
    if isinstance(bn, nn.modules.lazy.LazyModuleMixin):
        return f"{type(bn).__name__} is not initialized yet"
    if _has_hooks(bn):
        return "the BatchNorm has hooks"
    return None


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalizes with batch statistics now (``nn.BatchNorm2d``'s rule; never for a frozen BN)."""
    return isinstance(bn, _BatchNorm) and (bn.training or bn.running_mean is None or bn.running_var is None)


def norm_activation(bn: nn.Module) -> Optional[nn.Module]:
    """The activation module that a fusable norm applies itself (timm's norm + act layers), or None."""
    act = bn._modules.get("act")
    return None if act is None or type(bn).forward is _BatchNorm.forward else act


def epilogue(bn: nn.Module, act: Optional[nn.Module], residual: bool) -> Optional[Tuple[str, Optional[nn.Module]]]:
    """How ``act(bn(y) (+ residual))`` runs after a fusable ``bn``: ``(fused activation, module
    applied after the fused op or None)``, or None when it cannot be fused.

    An ``act`` that is not a fused activation runs after an ``"identity"``
    epilogue. A norm with its own activation (timm's ``BatchNormAct2d``) puts
    it in the epilogue, ``act`` running after it (relu after relu is relu);
    before a residual add it cannot be fused (the epilogue adds the residual
    before activating).
    """
    name = activation_name(act)
    inner = norm_activation(bn)
    if inner is not None:
        inner_name = activation_name(inner)
        if inner_name != "identity":
            if residual:
                return None
            return inner_name, (None if name == "identity" or name == inner_name == "relu" else act)
    return ("identity", act) if name is None else (name, None)


def norm_before_residual_unfusable_reason(bn: nn.Module) -> Optional[str]:
    """Why ``bn``, followed by a residual add, must run unfused although it is fusable, or None."""
    inner = norm_activation(bn)
    if inner is None or activation_name(inner) == "identity":
        return None
    return (
        f"{type(bn).__name__} applies {type(inner).__name__} before the residual add (the fused "
        "epilogue adds the residual first)"
    )


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 math for every dtype but fp64 (as ``fastres.reference``)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------
# Train mode: batch statistics.
# ----------------------------------------------------------------------------


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
    stride, padding, dilation, groups = ctx.conv_args
    w = _cast(weight, ctx.low)
    conv_bwd = lambda inp, mask: torch.ops.aten.convolution_backward(  # noqa: E731
        dy, inp, w, ctx.bias_sizes, stride, padding, dilation, False, [0, 0], groups, mask
    )
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
    y = F.conv2d(a, _cast(weight, low), _cast(bias, low), *conv_args)
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
    ct = compute_dtype(t.dtype)
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
        yc = F.conv2d(a, _cast(weight, ctx.low), _cast(bias, ctx.low), *ctx.conv_args) - center.view(1, -1, 1, 1)
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


def _train_unit(
    x, conv: nn.Conv2d, bn: _BatchNorm, fused_act: str, post: Optional[nn.Module], residual: Optional[Tensor],
    backend: Optional[str], low: Optional[torch.dtype], defer: bool, memory: str,
):
    """A conv -> BN (batch statistics) -> act (+ residual) unit in training (module docstring);
    ``fused_act``, ``post``: the epilogue's activation and the module run after it (:func:`epilogue`)."""
    if isinstance(x, PendingBN):
        src, scale_prev, shift_prev, act_prev = x.yc, x.scale, x.shift, x.activation
    else:
        src, scale_prev, shift_prev, act_prev = _cast(x, low), None, None, "identity"
    weight, bias = conv.weight, conv.bias  # cast to low inside the units (:func:`_conv_backward`)
    conv_args = (tuple(conv.stride), tuple(conv_padding(conv)), tuple(conv.dilation), conv.groups)
    deferred = defer and residual is None and post is None
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
        residual = _cast(residual, src.dtype if low is not None else None)
        out, var, mean_c, center = _ConvBNActRecompute.apply(
            src, scale_prev, shift_prev, weight, bias, bn.weight, bn.bias, residual, conv_args, act_prev,
            fused_act, bn.eps, backend, low, update,
        )
        return out if post is None else post(out)
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
    residual = _cast(residual, yc.dtype if low is not None else None)
    out = ops.bn_act(yc, scale, shift, residual, fused_act, backend=backend)
    return out if post is None else post(out)


def _values_per_channel(src: Tensor, weight: Tensor, conv_args) -> int:
    """``N * H_out * W_out`` of the conv; ``nn.BatchNorm2d``'s error if it is 1 or less."""
    stride, padding, dilation, _ = conv_args
    out = [src.shape[0], weight.shape[0]]
    for i in range(2):
        out.append((src.shape[2 + i] + 2 * padding[i] - dilation[i] * (weight.shape[2 + i] - 1) - 1) // stride[i] + 1)
    n = out[0] * out[2] * out[3]
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(out)}")
    return n


class _MaxPool2dIndices(torch.autograd.Function):
    """``F.max_pool2d(x, ...)`` that keeps only its indices for backward.

    Autograd's ``max_pool2d_with_indices`` keeps its input as well, though its
    backward reads only the input's shape and memory format: in a ResNet stem
    that input is the largest activation of the network (the stem's
    ``relu(bn1(conv1(x)))``, 4x the pooled output), kept for nothing when the
    stem unit itself does not keep it.
    """

    @staticmethod
    def forward(x, kernel_size, stride, padding, dilation, ceil_mode):
        return torch.ops.aten.max_pool2d_with_indices(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, *ctx.args = inputs
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(output[1])
        ctx.shape, ctx.dtype = x.shape, x.dtype
        ctx.memory_format = torch.channels_last if _layout_is_channels_last(x) else torch.contiguous_format

    @staticmethod
    def backward(ctx, grad, _grad_indices):
        (indices,) = ctx.saved_tensors
        # the input's shape and layout only, never read
        like = torch.empty(ctx.shape, dtype=ctx.dtype, device=grad.device, memory_format=ctx.memory_format)
        return (torch.ops.aten.max_pool2d_with_indices_backward(grad, like, *ctx.args, indices),) + (None,) * 5


def _layout_is_channels_last(x: Tensor) -> bool:
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def max_pool(pool: nn.Module, x: Tensor) -> Tensor:
    """``pool(x)``; in training, a plain ``nn.MaxPool2d`` runs as :class:`_MaxPool2dIndices`."""
    if (
        type(pool) is not nn.MaxPool2d or _has_hooks(pool) or pool.return_indices or is_jit_or_fx_tracing()
        or not torch.is_grad_enabled() or not x.requires_grad or x.dim() != 4
    ):
        return pool(x)
    pair = lambda v: (v, v) if isinstance(v, int) else tuple(v)  # noqa: E731
    stride = pool.kernel_size if pool.stride is None else pool.stride
    return _MaxPool2dIndices.apply(
        x, pair(pool.kernel_size), pair(stride), pair(pool.padding), pair(pool.dilation), pool.ceil_mode
    )[0]


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


# ----------------------------------------------------------------------------
# Eval mode: running statistics, cached.
# ----------------------------------------------------------------------------


def eval_scale_shift(bn: _BatchNorm, conv_bias: Optional[Tensor], ct: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``bn(conv(x) + conv_bias)`` with running statistics as ``conv(x) * scale + shift``."""
    scale, shift = ops.bn_scale_shift(bn)
    scale, shift = scale.to(ct), shift.to(ct)
    if conv_bias is not None:
        shift = shift + scale * conv_bias.to(ct)
    return scale, shift


def _version(t: Tensor) -> Optional[int]:
    """``t``'s autograd version counter; None for an inference tensor, which has none."""
    return None if t.is_inference() else t._version


def _plain(t: Tensor) -> bool:
    """A real tensor whose data_ptr and version counter mean something (not fake, functional, batched)."""
    return type(t) in (torch.Tensor, nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


class PreparedCache:
    """What a module derives from its parameters for each fused conv, computed once, never stale.

    An entry is keyed by ``(slot, kind)``: ``slot`` names the conv/BN pair in
    the module (``"bn1"``, ``"downsample"``...), ``kind`` the derived form:

    * ``"scale_shift"``: the eval-mode fp32 ``(scale, shift)`` (:func:`eval_scale_shift`);
    * ``"onednn"``: the BN-folded, prepacked oneDNN weight and bias of the CPU
      path (``fastres._onednn.prepare``);
    * ``"weight"``: the conv weight in the dtype and layout the kernels read
      (autocast's low-precision copy; channels_last, i.e. KRSC, for
      channels_last inputs), so the GPU kernels copy no weight per call;
    * any other name a backend uses for its own form (see :meth:`get`).

    A ``(slot, kind)`` holds one value: a new form (another dtype, layout...)
    replaces the old one, so each kind keeps at most one prepared copy per conv.

    A value is reused only while every source tensor (the conv weight/bias, BN
    weight, bias, running_mean, running_var, as the form needs) is the same
    object, with the same data_ptr, dtype, device and autograd version counter,
    and the form's extra key (``eps``, dtypes, layout, conv geometry) and
    inference mode are unchanged. In-place edits (under ``no_grad``, by an
    optimizer, ``load_state_dict``) bump version counters; ``module.to()``/
    ``.half()`` change data pointers (each entry pins the old storages, so an
    address cannot be reused while the entry lives); assigning new parameters
    changes identities. Edits through ``.data`` bypass version counters: the
    owning modules drop their entries on ``train()``/``eval()`` and ``_apply``
    (``.to``, ``.cuda``...), and :meth:`clear` (or
    ``fastres.nn.clear_cache(model)``) drops them explicitly.

    Inference tensors (a model built, copied, cast or loaded inside
    ``torch.inference_mode()``) have no version counter. They cannot be edited
    in place outside inference mode (PyTorch raises), and inside it the
    in-place edits PyTorch's module API makes are caught: ``load_state_dict``
    (which copies in place) drops the owning modules' entries, as do
    ``train()``/``eval()`` around a training-mode forward that updates running
    statistics. Other in-place edits of inference tensors inside inference
    mode (``bn.running_var.mul_(2)``, ``.data`` edits, a BN's own
    ``load_state_dict``, a training forward after ``bn.train()`` on the BN
    alone) are not seen: call ``fastres.nn.clear_cache`` after them.

    Nothing is cached (the form is recomputed, which is always correct):

    * under ``torch.compile``/``torch.export``, FX or JIT tracing, so nothing
      stale is captured and the traced graph reads the parameters themselves;
    * during CUDA-graph capture, for the same reason;
    * when autograd must reach a source (grad mode on and it requires grad:
      frozen-statistics fine-tuning); with grad mode on but no source
      requiring grad, the form is cached;
    * for non-plain tensors (fake, functional, functorch-wrapped).
    """

    def __init__(self) -> None:
        self._entries: Dict[Tuple[str, str], tuple] = {}

    def clear(self) -> None:
        self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self, kind: Optional[str] = None) -> int:
        """Bytes held by the cached values (of ``kind``; all when None): the prepared copies' resident memory."""
        return sum(_nbytes(entry[3]) for (_, k), entry in self._entries.items() if kind in (None, k))

    def get(self, slot: str, kind: str, sources: Tuple[Optional[Tensor], ...], extra: tuple,
            make: Callable[[], Any], x: Tensor):
        """``make()``, or its cached value for ``(slot, kind)`` while ``sources`` and ``extra`` are unchanged.

        ``sources``: every parameter or buffer ``make`` reads (None for absent
        ones); ``extra``: everything else its result depends on (hashable);
        ``x``: the call's input (CUDA-graph capture is checked on its device).
        A backend's own form (e.g. a cuDNN-ready folded weight) is one call:
        ``cache.get(slot, "cudnn", sources, (dtype, ...), make, x)``.
        """
        if not _cacheable(sources, x):
            return make()
        key = tuple(
            None if t is None else (t.data_ptr(), _version(t), t.dtype, t.device) for t in sources
        ) + extra + (torch.is_inference_mode_enabled(),)
        entry = self._entries.get((slot, kind))
        if entry is not None and entry[0] == key and all(a is b for a, b in zip(entry[1], sources)):
            return entry[3]
        value = make()
        pins = tuple(None if t is None else t.detach() for t in sources)  # keeps the storages alive
        self._entries[(slot, kind)] = (key, sources, pins, value)
        return value

    def scale_shift(self, slot: str, bn: _BatchNorm, conv_bias: Optional[Tensor], x: Tensor) -> Tuple[Tensor, Tensor]:
        """Eval-mode ``(scale, shift)`` in ``x``'s compute dtype (fp32, fp64 for fp64)."""
        ct = compute_dtype(x.dtype)
        sources = (bn.weight, bn.bias, bn.running_mean, bn.running_var, conv_bias)
        return self.get(slot, "scale_shift", sources, (float(bn.eps), ct), lambda: eval_scale_shift(bn, conv_bias, ct), x)


def _nbytes(value) -> int:
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if callable(getattr(value, "nbytes", None)):
        return value.nbytes()
    return sum(_nbytes(v) for v in value)


def _cacheable(sources, x: Tensor) -> bool:
    if is_tracing():
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    grad = torch.is_grad_enabled()
    for t in sources:
        if t is None:
            continue
        if not _plain(t) or (grad and t.requires_grad):
            return False
    return True


# ----------------------------------------------------------------------------
# The one entry point.
# ----------------------------------------------------------------------------


def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def _cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    if t is None or dtype is None or t.dtype == dtype or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _unfused(x: Tensor, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module], residual: Optional[Tensor]) -> Tensor:
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return out if act is None else act(out)


def conv_padding(conv: nn.Conv2d):
    return (0, 0) if conv.padding == "valid" else conv.padding


def _fits(x: Tensor, weight: Tensor, residual: Optional[Tensor], stride, padding, dilation, groups: int) -> bool:
    """Whether the conv is well-formed for ``x`` (else ``fastres.ops`` raises the error that says why)."""
    if x.dim() != 4 or x.shape[1] != weight.shape[1] * groups or x.shape[0] == 0:
        return False
    xs, ws = x.shape, weight.shape
    out = [xs[0], ws[0]]
    for i in (0, 1):
        size = _layout.conv_out_size(xs[2 + i], ws[2 + i], stride[i], padding[i], dilation[i])
        if size < 1:
            return False
        out.append(size)
    return residual is None or (
        list(residual.shape) == out and residual.dtype == x.dtype and residual.device == x.device
    )


def _kernel_weight(cache: PreparedCache, slot: str, weight: Tensor, dtype: torch.dtype, x: Tensor) -> Tensor:
    """The conv weight as the kernels read it: in ``dtype`` (autocast), and channels_last (KRSC) for a
    channels_last ``x`` (the output format stays channels_last, F.conv2d's rule), prepared once."""
    cl = _layout.is_channels_last(x)
    if weight.dtype == dtype and (not cl or weight.is_contiguous(memory_format=torch.channels_last)):
        return weight
    if not _cacheable((weight,), x):
        return _cast(weight, dtype)

    def make() -> Tensor:
        w = weight.to(dtype)
        return w.contiguous(memory_format=torch.channels_last) if cl else w

    return cache.get(slot, "weight", (weight,), (dtype, cl), make, x)


def _eval_conv_bn_act(
    cache: Optional[PreparedCache], slot: str, x: Tensor, conv: nn.Conv2d, bn: _BatchNorm, act: str,
    residual: Optional[Tensor], backend: Optional[str], low: Optional[torch.dtype],
) -> Tensor:
    """Eval mode (running statistics): one ``conv_bn_act`` from the module's prepared forms.

    CPU inference (``backend`` None or ``"torch"``, no gradient needed) runs
    oneDNN's fused conv on the BN-folded prepacked weight (``"onednn"``
    form); everything else runs ``fastres.ops.conv_bn_act`` with the cached
    ``"scale_shift"`` and ``"weight"`` forms.
    """
    stride, padding, dilation, groups = tuple(conv.stride), tuple(conv_padding(conv)), tuple(conv.dilation), conv.groups
    x, residual = _cast(x, low), _cast(residual, low)
    weight = conv.weight
    wdtype = weight.dtype if low is None or weight.dtype == torch.float64 else low
    sources = (weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, conv.bias)
    if (
        backend in (None, "torch")
        and wdtype == x.dtype
        and _onednn.usable(x, residual, act)
        and not (torch.is_grad_enabled() and _requires_grad(x, residual, *sources))
        and _fits(x, weight, residual, stride, padding, dilation, groups)
    ):
        def make() -> _onednn.Prepared:
            scale, shift = eval_scale_shift(bn, conv.bias, torch.float32)
            return _onednn.prepare(x, weight, scale, shift, stride, padding, dilation, groups)

        # The weight's own layout is part of its identity (a new layout is a new storage).
        form = (float(bn.eps), x.dtype, _layout.suggests_channels_last(x), stride, padding, dilation, groups)
        p = make() if cache is None else cache.get(slot, "onednn", sources, form, make, x)
        return _onednn.run(p, x, residual, act)
    if cache is None:
        scale, shift = eval_scale_shift(bn, conv.bias, compute_dtype(x.dtype))
        weight = _cast(weight, low)
    else:
        scale, shift = cache.scale_shift(slot, bn, conv.bias, x)
        weight = _kernel_weight(cache, slot, weight, wdtype, x)
    return ops.conv_bn_act(
        x, weight, scale, shift, residual, stride=stride, padding=padding, dilation=dilation, groups=groups,
        activation=act, backend=backend,
    )


def _requires_grad(*tensors: Optional[Tensor]) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def conv_bn_act(
    cache: Optional[PreparedCache],
    slot: str,
    x,
    conv: nn.Module,
    bn: nn.Module,
    act: Optional[nn.Module],
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
    defer: bool = False,
    memory: str = "low",
):
    """``act(bn(conv(x)) (+ residual))``, fused as far as the modules allow (module docstring).

    ``x`` is a tensor or the previous unit's :class:`PendingBN`. With
    ``defer=True`` a training unit without residual returns a
    :class:`PendingBN` for the next unit's conv (the caller must only feed it
    to :func:`conv_bn_act` or :func:`materialize`); otherwise a tensor.
    """
    if conv_unfusable_reason(conv) is not None or bn_unfusable_reason(bn, runtime=True) is not None:
        return _unfused(materialize(x, backend), conv, bn, act, residual)
    plan = epilogue(bn, act, residual is not None)
    if plan is None:
        return _unfused(materialize(x, backend), conv, bn, act, residual)
    fused_act, post = plan
    low = _autocast_dtype(x.yc if isinstance(x, PendingBN) else x)  # custom ops do not autocast: cast as F.conv2d would
    if uses_batch_stats(bn):
        return _train_unit(x, conv, bn, fused_act, post, residual, backend, low, defer, memory)
    out = _eval_conv_bn_act(cache, slot, materialize(x, backend), conv, bn, fused_act, residual, backend, low)
    return out if post is None else post(out)
