"""The public functional API of fastres.

Each function validates its arguments once (errors name the argument and what
was expected, ``fastres._checks``), resolves the backend in the registry
(``fastres.backends``) and runs the implementation the registry selects. The
backends' custom ops (``torch.ops.fastres.<op>_<backend>``) share one fake
kernel and one autograd formula per op (``fastres._opdefs``).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastres import _checks, _tune, backends, reference

_IntOrPair = Union[int, Sequence[int]]
# A module's cache of prepared forms: (impl, args) -> the impl's form for these args (fastres.nn.prepared).
Prepared = Callable[[object, tuple], object]


def add_act(x: Tensor, residual: Tensor, activation: str = "relu", *, backend: Optional[str] = None) -> Tensor:
    """``act(x + residual)`` in one pass (fp32 math, one rounding).

    ``x`` and ``residual`` must have the same shape, dtype and device. The
    output has ``x``'s dtype and memory format. Replaces
    ``torch.relu(x + residual)``.
    """
    _checks.check_add_act("fastres.ops.add_act", x, residual, activation)
    return backends.run("fastres.ops.add_act", "add_act", backend, (x, residual, activation))


def bn_act(
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor] = None,
    activation: str = "relu",
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """``act(x * scale[c] + shift[c] (+ residual))`` over channel dim 1 of a 4-D ``x``.

    ``scale`` and ``shift`` are fp32 vectors of length C (see
    :func:`bn_scale_shift`); the math is fp32 and the output has ``x``'s dtype
    and memory format. Replaces ``torch.relu(bn(x) + residual)``.
    """
    _checks.check_bn_act("fastres.ops.bn_act", x, scale, shift, residual, activation)
    return backends.run("fastres.ops.bn_act", "bn_act", backend, (x, scale, shift, residual, activation))


def bn_act_backward(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    activation: str,
    residual_grad: bool,
    output: bool = False,
    *,
    backend: Optional[str] = None,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The backward of :func:`bn_act` in one pass: ``(grad_x, grad_z, grad_scale, grad_shift, y)``.

    With ``z = x * scale[c] + shift[c] (+ residual)``: ``grad_z = grad * act'(z)``
    (the residual's gradient; an empty tensor unless ``residual_grad``),
    ``grad_x = grad_z * scale[c]``, ``grad_scale[c] = sum(grad_z * x)``,
    ``grad_shift[c] = sum(grad_z)`` over ``(N, H, W)``, and ``y = act(z)``, the
    forward output recomputed in the same pass (an empty tensor unless
    ``output``), for a caller that keeps ``x`` instead of ``y`` and needs ``y`` back,
    e.g. for the weight gradient of a conv that ``y`` feeds.
    """
    op = "fastres.ops.bn_act_backward"
    _checks.check_bn_act(op, x, scale, shift, residual, activation)
    _checks.check_like(op, "grad", grad, x)
    return backends.run(op, "bn_act_backward", backend,
                        (grad, x, scale, shift, residual, activation, residual_grad, output))


def conv_bn_act(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor] = None,
    *,
    stride: _IntOrPair = 1,
    padding: _IntOrPair = 0,
    dilation: _IntOrPair = 1,
    groups: int = 1,
    activation: str = "relu",
    backend: Optional[str] = None,
) -> Tensor:
    """``act(conv2d(x, weight, stride, padding, dilation, groups) * scale[k] + shift[k] (+ residual))``.

    No bias: fold it into ``shift``. ``scale``/``shift`` are fp32 vectors of
    length K; ``residual`` has the output's shape and ``x``'s dtype. The output
    memory format is what ``F.conv2d`` gives (channels_last if ``x`` or
    ``weight`` is). Replaces ``relu(bn(conv(x)) (+ residual))``.

    The ``"torch"`` backend runs CPU inference (fp32, bf16, fp16; no gradient
    needed, not tracing) through oneDNN's fused convolution with the BN scale
    folded into the weight in fp32 and rounded once (``fastres._onednn``; a
    ``fastres.nn`` module prepares that weight once, this function per call),
    else the reference. The ``"cudnn"`` backend folds the BN into the weight
    (``fastres._cudnn``). ``backend=None`` on CUDA chooses per shape, measuring
    on first use (``fastres.tune``); elsewhere it is ``"torch"``.
    """
    return run_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, backend)


def run_conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation,
                    backend: Optional[str], prepared: Optional[Prepared] = None) -> Tensor:
    """:func:`conv_bn_act`, with the prepared forms of a module (``fastres.nn``) when given."""
    op = "fastres.ops.conv_bn_act"
    stride, padding, dilation = _checks.check_conv_bn_act(
        op, x, weight, scale, shift, residual, stride, padding, dilation, groups, activation
    )
    args = (x, weight, scale, shift, residual, list(stride), list(padding), list(dilation), groups, activation)
    if backend is None and x.device.type in _tune.TUNED_DEVICE_TYPES:
        # Per shape, the fastest of the usable candidates, measured on first use (fastres.tune).
        backend = _tune.conv_backend(args, lambda name: _conv_bn_act_on(name, args, prepared))
        return _conv_bn_act_on(backend, args, prepared)
    return _conv_bn_act_on(backends.resolve(op, backend, x.device, "conv_bn_act"), args, prepared)


def _conv_bn_act_on(backend: str, args: tuple, prepared: Optional[Prepared]) -> Tensor:
    impl = backends.select("fastres.ops.conv_bn_act", "conv_bn_act", backend, args)
    if prepared is not None and impl.prepare is not None:
        return impl.run(prepared(impl, args), *args)
    return impl.fn(*args)


_FROZEN_BN_TENSORS = ("weight", "bias", "running_mean", "running_var")


def bn_scale_shift(bn: torch.nn.Module) -> Tuple[Tensor, Tensor]:
    """Eval-mode ``bn`` as fp32 ``(scale, shift)`` with ``bn(x) == x * scale + shift``.

    ``bn``: an ``nn.BatchNorm`` module (its running statistics, so it must
    track them), or a frozen BN with ``weight``, ``bias``, ``running_mean``,
    ``running_var`` tensors and ``eps`` (``torchvision.ops.misc.FrozenBatchNorm2d``).
    Differentiable with respect to ``bn.weight`` and ``bn.bias`` (frozen-statistics
    fine-tuning).
    """
    if not isinstance(bn, torch.nn.modules.batchnorm._BatchNorm) and not (
        isinstance(bn, torch.nn.Module)
        and all(isinstance(getattr(bn, a, None), Tensor) for a in _FROZEN_BN_TENSORS)
        and isinstance(getattr(bn, "eps", None), (int, float))
    ):
        raise TypeError(
            "fastres.ops.bn_scale_shift: expected an nn.BatchNorm module or a frozen BN (tensors weight, bias, "
            f"running_mean, running_var and a number eps), got {type(bn).__name__}"
        )
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            "fastres.ops.bn_scale_shift: `bn` has track_running_stats=False, so even in eval mode it "
            "normalizes with batch statistics and has no fixed scale and shift"
        )
    return reference.bn_scale_shift(bn)
