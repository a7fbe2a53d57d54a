"""The public functional API of fastres, and the registration of its custom ops.

Public functions validate their arguments (errors name the argument and what
was expected), pick a backend (``fastres.backends``) and run it:

* ``"torch"`` calls ``fastres.reference`` directly (plain autograd);
* ``"triton"`` and ``"cuda"`` call the custom ops ``torch.ops.fastres.<op>_<backend>``.

Custom ops (each with a fake kernel and autograd registered here):

==========================================  ===========================================
op                                          computes
==========================================  ===========================================
``add_act_{triton,cuda}``                   ``act(x + residual)``
``add_act_backward_{triton,cuda}``          ``grad * act'(x + residual)``
``bn_act_{triton,cuda}``                    ``act(x * scale[c] + shift[c] (+ residual))``
``bn_act_backward_{triton,cuda}``           ``(grad_x, grad_z, grad_scale, grad_shift, y)``
``conv_bn_act_{triton,cuda}``               ``act(conv2d(x, w) * scale[k] + shift[k] (+ r))``
``conv_bias_relu_cudnn``                    ``relu(conv2d(x, w') + b'[k] (+ r))``, BN folded
==========================================  ===========================================

The ``"cudnn"`` backend of ``conv_bn_act`` is ``fastres._cudnn.conv_bn_act``:
cuDNN's fused conv (the op above, with its own fake kernel and autograd) where
cuDNN fuses the epilogue, else PyTorch's conv followed by ``bn_act``.

The Triton ops are defined next to their kernels (``fastres/triton/``); the
CUDA ops' schemas are in ``csrc/bindings.cpp``. Both backends of an op share
one fake kernel and one autograd formula, defined here.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from fastres import _cpu_bn, _cudnn, _layout, _onednn, _tune, backends, reference
from fastres._checks import (
    check_activation,
    check_channel_vector,
    check_device,
    check_input,
    check_like,
    pair,
)
from fastres._tracing import is_tracing

if backends.TRITON_VERSION is not None:  # else the triton backend reports why it is missing
    import fastres.triton  # noqa: F401  (defines the triton ops)

_IntOrPair = Union[int, Sequence[int]]

# ----------------------------------------------------------------------------
# Validation, shared by the public API and the fake kernels.
# ----------------------------------------------------------------------------


def _check_add_act(op: str, x, residual, activation) -> None:
    check_input(op, "x", x)
    check_like(op, "residual", residual, x)
    check_activation(op, activation)


def _check_bn_act(op: str, x, scale, shift, residual, activation) -> None:
    check_input(op, "x", x, ndim=4)
    check_channel_vector(op, "scale", scale, x, x.shape[1])
    check_channel_vector(op, "shift", shift, x, x.shape[1])
    if residual is not None:
        check_like(op, "residual", residual, x)
    check_activation(op, activation)


def _conv_out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> Tuple[int, int, int, int]:
    h, w = (
        _layout.conv_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i])
        for i in range(2)
    )
    return (x.shape[0], weight.shape[0], h, w)


def _check_conv_bn_act(op: str, x, weight, scale, shift, residual, stride, padding, dilation, groups, activation):
    """Validates and returns the normalized (stride, padding, dilation)."""
    check_input(op, "x", x, ndim=4)
    check_input(op, "weight", weight, ndim=4)
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: expected `weight` to have the dtype of `x`, {x.dtype}, got {weight.dtype}")
    check_device(op, "weight", weight, x)
    stride, padding, dilation = (pair(op, n, v) for n, v in (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"{op}: expected stride >= 1, padding >= 0 and dilation >= 1, got "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: expected `groups` to be a positive int, got {groups!r}")
    k, cg = weight.shape[0], weight.shape[1]
    if x.shape[1] != cg * groups or k % groups != 0:
        raise ValueError(
            f"{op}: expected `weight` of shape (K, C/groups, R, S) with K divisible by groups={groups} "
            f"and C/groups = {x.shape[1]}/{groups}; got weight {tuple(weight.shape)} for x {tuple(x.shape)}"
        )
    if min(x.shape[1:]) < 1 or min(weight.shape) < 1:  # F.conv2d refuses these too
        raise ValueError(
            f"{op}: expected `x` with non-zero C, H, W and a non-empty `weight`, got x {tuple(x.shape)} "
            f"and weight {tuple(weight.shape)}"
        )
    out = _conv_out_shape(x, weight, stride, padding, dilation)
    if out[2] < 1 or out[3] < 1:
        raise ValueError(
            f"{op}: the convolution output would be empty ({out}): input {tuple(x.shape)} is smaller "
            f"than the dilated kernel {tuple(weight.shape[2:])} with padding {padding}"
        )
    check_channel_vector(op, "scale", scale, x, k)
    check_channel_vector(op, "shift", shift, x, k)
    if residual is not None:
        check_input(op, "residual", residual)
        if tuple(residual.shape) != out or residual.dtype != x.dtype:
            raise ValueError(
                f"{op}: expected `residual` of the output's shape {out} and dtype {x.dtype}, "
                f"got {tuple(residual.shape)} {residual.dtype}"
            )
        check_device(op, "residual", residual, x)
    check_activation(op, activation)
    return stride, padding, dilation


# ----------------------------------------------------------------------------
# Fake kernels and autograd, one per op family, registered for each backend.
# ----------------------------------------------------------------------------


def _add_act_fake(x, residual, activation):
    _check_add_act("add_act", x, residual, activation)
    return torch.empty_like(_layout.dense(x))


def _add_act_backward_fake(grad, x, residual, activation):
    return torch.empty_like(_layout.dense(x))


def _bn_act_fake(x, scale, shift, residual, activation):
    _check_bn_act("bn_act", x, scale, shift, residual, activation)
    return torch.empty_like(_layout.dense(x))


def _bn_act_backward_fake(grad, x, scale, shift, residual, activation, residual_grad, output=False):
    x = _layout.dense(x)
    grad_z = torch.empty_like(x) if residual_grad else x.new_empty(0)
    y = torch.empty_like(x) if output else x.new_empty(0)
    return torch.empty_like(x), grad_z, torch.empty_like(scale), torch.empty_like(shift), y


def _conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation):
    _check_conv_bn_act("conv_bn_act", x, weight, scale, shift, residual, stride, padding, dilation, groups, activation)
    fmt = torch.channels_last if _layout.conv_out_channels_last(x, weight) else torch.contiguous_format
    return x.new_empty(_conv_out_shape(x, weight, stride, padding, dilation)).contiguous(memory_format=fmt)


def _add_act_setup(ctx, inputs, output):
    x, residual, activation = inputs
    ctx.save_for_backward(x, residual)
    ctx.activation = activation


def _add_act_autograd(backward_op):
    def backward(ctx, grad):
        x, residual = ctx.saved_tensors
        grad_z = backward_op(grad, x, residual, ctx.activation)
        need = ctx.needs_input_grad
        return (grad_z if need[0] else None), (grad_z if need[1] else None), None

    return backward


def _bn_act_setup(ctx, inputs, output):
    x, scale, shift, residual, activation = inputs
    ctx.save_for_backward(x, scale, shift, residual)
    ctx.activation = activation


def _bn_act_autograd(backward_op):
    def backward(ctx, grad):
        x, scale, shift, residual = ctx.saved_tensors
        need = ctx.needs_input_grad
        residual_grad = residual is not None and need[3]
        gx, gz, gscale, gshift, _ = backward_op(grad, x, scale, shift, residual, ctx.activation, residual_grad)
        return (
            gx if need[0] else None,
            gscale if need[1] else None,
            gshift if need[2] else None,
            gz if residual_grad else None,
            None,
        )

    return backward


def _conv_bn_act_setup(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, activation = inputs
    ctx.save_for_backward(x, weight, scale, shift, residual)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.activation = activation


def _conv_bn_act_autograd(bn_act_backward_op):
    """Backward of the fused conv: recompute the conv, fused BN/act backward, aten conv backward."""

    def backward(ctx, grad):
        x, weight, scale, shift, residual = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need = ctx.needs_input_grad
        conv = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
        residual_grad = residual is not None and need[4]
        gconv, gz, gscale, gshift, _ = bn_act_backward_op(
            grad, conv, scale, shift, residual, ctx.activation, residual_grad
        )
        gx = gw = None
        if need[0] or need[1]:
            gx, gw, _ = torch.ops.aten.convolution_backward(
                gconv, x, weight, None, stride, padding, dilation, False, [0, 0], groups,
                [need[0], need[1], False],
            )
        return (
            gx,
            gw,
            gscale if need[2] else None,
            gshift if need[3] else None,
            gz if residual_grad else None,
            None, None, None, None, None,
        )

    return backward


def _defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"fastres::{name}", "")
    except RuntimeError:
        return False
    return True


def _register_family(op: str, fake, setup, autograd, backward: Optional[Tuple[str, Callable]]) -> Dict[str, object]:
    """Register fake and autograd for every defined backend op of ``op``; returns backend -> op."""
    found = {}
    for backend in ("triton", "cuda"):
        name = f"{op}_{backend}"
        if not _defined(name):
            continue
        torch.library.register_fake(f"fastres::{name}")(fake)
        if backward is not None:
            bwd_family, bwd_fake = backward
            bwd_name = f"{bwd_family}_{backend}"
            torch.library.register_fake(f"fastres::{bwd_name}")(bwd_fake)
            bwd_op = getattr(torch.ops.fastres, bwd_name)
        else:
            bwd_op = getattr(torch.ops.fastres, f"bn_act_backward_{backend}")
        torch.library.register_autograd(f"fastres::{name}", autograd(bwd_op), setup_context=setup)
        found[backend] = getattr(torch.ops.fastres, name)
    return found


_OPS = {
    "add_act": _register_family(
        "add_act", _add_act_fake, _add_act_setup, _add_act_autograd,
        ("add_act_backward", _add_act_backward_fake),
    ),
    "bn_act": _register_family(
        "bn_act", _bn_act_fake, _bn_act_setup, _bn_act_autograd,
        ("bn_act_backward", _bn_act_backward_fake),
    ),
    "conv_bn_act": _register_family(
        "conv_bn_act", _conv_bn_act_fake, _conv_bn_act_setup, _conv_bn_act_autograd, None
    ),
}


_OPS["conv_bn_act"]["cudnn"] = _cudnn.conv_bn_act  # a Python function around the fused cuDNN op

# The backward op of each bn_act op (for the public bn_act_backward).
_BACKWARD_OPS = {
    op: getattr(torch.ops.fastres, f"bn_act_backward_{backend}") for backend, op in _OPS["bn_act"].items()
}


def _torch_bn_act(x, scale, shift, residual, activation):
    impl = _cpu_bn if _cpu_bn.applies(x, scale, residual, activation) else reference
    return impl.bn_act(x, scale, shift, residual, activation)


def _torch_bn_act_backward(grad, x, scale, shift, residual, activation, residual_grad, output=False):
    impl = _cpu_bn if _cpu_bn.applies(x, scale, residual, activation) else reference
    return impl.bn_act_backward(grad, x, scale, shift, residual, activation, residual_grad, output)


class _TorchBNAct(torch.autograd.Function):
    """The ``"torch"`` backend's ``bn_act`` under autograd, with the kernel ops' autograd
    (:func:`_bn_act_setup`: it keeps ``x`` and the residual, tensors its callers keep
    anyway): autograd through the reference's ops would keep their fp32 intermediates,
    two extra fp32 copies per call for a bf16 input."""

    @staticmethod
    def forward(x, scale, shift, residual, activation):
        return _torch_bn_act(x, scale, shift, residual, activation)

    setup_context = staticmethod(_bn_act_setup)
    backward = staticmethod(_bn_act_autograd(_torch_bn_act_backward))


def implemented_backends(op: str) -> List[str]:
    """The backends this build implements for ``op`` ("torch" always)."""
    return ["torch", *_OPS[op]]


def _run(op: str, backend: Optional[str], device: torch.device):
    """Resolve the backend; returns the kernel to call, or None for the reference."""
    chosen = backends.resolve(f"fastres.ops.{op}", backend, device, implemented_backends(op))
    return None if chosen == "torch" else _OPS[op][chosen]


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------


def add_act(x: Tensor, residual: Tensor, activation: str = "relu", *, backend: Optional[str] = None) -> Tensor:
    """``act(x + residual)`` in one pass (fp32 math, one rounding).

    ``x`` and ``residual`` must have the same shape, dtype and device. The
    output has ``x``'s dtype and memory format. Replaces
    ``torch.relu(x + residual)``.
    """
    _check_add_act("fastres.ops.add_act", x, residual, activation)
    fn = _run("add_act", backend, x.device)
    if fn is None:
        return reference.add_act(x, residual, activation)
    return fn(x, residual, activation)


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
    _check_bn_act("fastres.ops.bn_act", x, scale, shift, residual, activation)
    fn = _run("bn_act", backend, x.device)
    if fn is None:
        if torch.is_grad_enabled() and not is_tracing() and any(
            t is not None and t.requires_grad for t in (x, scale, shift, residual)
        ):
            return _TorchBNAct.apply(x, scale, shift, residual, activation)
        return _torch_bn_act(x, scale, shift, residual, activation)
    return fn(x, scale, shift, residual, activation)


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
    ``output``): the training path (``fastres/nn/_fuse.py``) keeps ``x`` instead
    of ``y`` for the backward and gets ``y`` back here for the weight gradient
    of the conv that ``y`` feeds.
    """
    _check_bn_act("fastres.ops.bn_act_backward", x, scale, shift, residual, activation)
    check_like("fastres.ops.bn_act_backward", "grad", grad, x)
    fn = _run("bn_act", backend, x.device)
    if fn is None:
        return _torch_bn_act_backward(grad, x, scale, shift, residual, activation, residual_grad, output)
    bwd = _BACKWARD_OPS[fn]
    return bwd(grad, x, scale, shift, residual, activation, residual_grad, output)


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
    else the reference.
    The ``"cudnn"`` backend folds the BN into the weight (``fastres._cudnn``).
    ``backend=None`` on CUDA chooses per shape, measuring on first use
    (``fastres.tune``); elsewhere it is ``"torch"``.
    """
    stride, padding, dilation = _check_conv_bn_act(
        "fastres.ops.conv_bn_act", x, weight, scale, shift, residual, stride, padding, dilation, groups, activation
    )
    args = (x, weight, scale, shift, residual, list(stride), list(padding), list(dilation), groups, activation)
    if backend is None and x.device.type in _tune.TUNED_DEVICE_TYPES:
        # Per shape, the fastest of the usable candidates, measured on first use (fastres.tune);
        # the cuda kernels' shape rules (docs/cuda_conv.md) are among the usability checks.
        backend = _tune.conv_backend(
            x, weight, residual, stride, padding, dilation, groups, activation,
            implemented_backends("conv_bn_act"), lambda name: _conv_bn_act_with(name, args),
        )
    return _conv_bn_act_with(backend, args)


def _conv_bn_act_with(backend: Optional[str], args) -> Tensor:
    """Run validated ``conv_bn_act`` arguments on ``backend`` (a backend name, None or ``"stock"``)."""
    if backend == "stock":
        return _cudnn.conv_then_bn_act(*args)
    x, weight, scale, shift, residual, activation = args[0], args[1], args[2], args[3], args[4], args[-1]
    fn = _run("conv_bn_act", backend, x.device)
    if fn is None:
        impl = _onednn.conv_bn_act if _onednn.applies(x, weight, scale, shift, residual, activation) else reference.conv_bn_act
        return impl(*args)
    return fn(*args)


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
