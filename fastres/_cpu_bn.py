"""``bn_act`` and its backward on the CPU: fastres's CPU kernels, else BatchNorm's own.

The ``"torch"`` backend of :func:`fastres.ops.bn_act` is the reference
(``fastres/reference.py``): a chain of elementwise PyTorch ops, each a full pass
over the tensor, and its backward a dozen more. On the CPU, where training runs
them once per conv, two faster routes give the reference's result:

* fastres's CPU kernels (``csrc/cpu/bn_act.cpp``, :func:`bn_act_native`): the
  affine, the residual add and ReLU or identity in one pass, in the reference's
  fp32 roundings (bit for bit), for fp32, fp64 and bf16 inputs
  (:func:`native_reason`); and nn.BatchNorm2d's training backward fused with the
  activation's (``fastres.nn._train``).
* where they do not apply (fp16; SiLU; an extension that is not built), ATen's
  BatchNorm kernels, one vectorized pass each (channels_last or NCHW, fp32
  accumulation for bf16/fp16): ``x * scale[c] + shift[c]`` is an eval-mode
  ``torch.batch_norm`` with ``weight=scale``, ``bias=shift``, ``running_mean=0``,
  ``running_var=1`` and ``eps=0`` (so its ``weight / sqrt(var + eps)`` is
  ``scale`` exactly), and ``(grad_z * scale[c], sum(grad_z * x), sum(grad_z))``
  is that batch norm's ``native_batch_norm_backward``. They give the reference's
  result up to the order of fp32 roundings for fp32 and fp64 (with ``scale`` of
  ``x``'s dtype), and for bf16/fp16 without a residual and with ReLU or identity
  (where ``grad_z`` is ``grad`` or zero, so the kernels round each output once
  from fp32, like the reference); a bf16/fp16 residual add or SiLU would round an
  intermediate there: a residual with ReLU or identity runs as
  :func:`bn_act_residual` instead (the reference's fp32 roundings in fewer passes;
  its forward only), SiLU keeps the reference.

NCHW or channels_last inputs only (for any other strides the reference's output
keeps them), and not under tracing: graphs keep the reference's plain ops.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from fastres import _extension, _layout, reference
from fastres._tracing import is_tracing

_LOW = (torch.bfloat16, torch.float16)
_NATIVE_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
NATIVE = _extension.has_cpu_kernels()


def _cpu_dense_reason(x: Tensor) -> Optional[str]:
    """Why no path of this module stands for the reference on ``x`` whatever its dtype, or None."""
    if x.device.type != "cpu":
        return "BatchNorm's CPU kernels need CPU tensors"
    if is_tracing():
        return "traced graphs keep the reference's plain ops"
    if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
        return "NCHW or channels_last x only (the reference's output keeps other strides)"
    return None


def _native_input_reason(x: Tensor) -> Optional[str]:
    """Why fastres's CPU kernels do not take ``x``, or None."""
    reason = _cpu_dense_reason(x)
    if reason is not None:
        return reason
    if not NATIVE:
        return f"fastres's CPU kernels are not loaded ({_extension.LOAD_ERROR or 'an extension without them'})"
    return None if x.dtype in _NATIVE_DTYPES else "float32, float64 or bfloat16 x only"


def native_reason(x: Tensor, scale_dtype: torch.dtype, residual: Optional[Tensor], act: str) -> Optional[str]:
    """Why fastres's CPU kernels (:func:`bn_act_native`, the fused training backward) do not
    stand for the reference here, or None."""
    reason = _native_input_reason(x)
    if reason is not None:
        return reason
    if scale_dtype != reference.compute_dtype(x.dtype):
        return "a scale of the compute dtype only"
    if act not in ("relu", "identity"):
        return "ReLU or identity only"
    if residual is not None and (residual.dtype != x.dtype or residual.stride() != x.stride()):
        return "a residual of x's dtype and strides only"
    return None


def bn_act_native(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], act: str,
                  reuse_x: bool = False) -> Tensor:
    """:func:`fastres.reference.bn_act` in one pass (``csrc/cpu/bn_act.cpp``); written over ``x``
    if ``reuse_x`` (the caller's own tensor, no longer needed: a full-size allocation fewer,
    whose first touch of fresh pages can cost more than the kernel)."""
    if reuse_x:
        torch.ops.fastres._bn_act_cpu_(x, scale, shift, residual, act)
        return x
    return torch.ops.fastres._bn_act_cpu(x, scale, shift, residual, act)


def bn_act_train_backward(grad: Tensor, x: Tensor, out: Optional[Tensor], scale: Tensor, shift: Tensor,
                          mean: Tensor, invstd: Tensor, act: str, grad_z: bool,
                          reuse: str = "") -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_weight, grad_bias, gz)``: ReLU's or identity's backward (ReLU's mask from
    ``out``, else recomputed from ``x``) and ``nn.BatchNorm2d``'s training backward with the batch
    statistics ``mean``, ``invstd`` and ``scale = weight * invstd``, ``shift = bias - mean *
    scale``, in two passes (``csrc/cpu/bn_act.cpp``; ``gz`` empty unless ``grad_z``).

    ``reuse``: ``"grad"`` or ``"x"``, a tensor of the caller's own that it no longer needs
    (a fresh gradient, a recomputed conv output), over which ``grad_x`` is written (for
    ``"grad"`` where it has ``x``'s strides), as :func:`bn_act_native`'s ``reuse_x``."""
    if reuse == "x" or reuse == "grad" and grad.dtype == x.dtype and grad.stride() == x.stride():
        grad = _layout.like(grad, x)  # the kernel's layout (a copy only for a grad of other strides)
        gw, gb, gz = torch.ops.fastres._bn_act_train_backward_cpu_(grad, x, out, scale, shift, mean, invstd, act,
                                                                   grad_z, reuse == "x")
        return (x if reuse == "x" else grad), gw, gb, gz
    return torch.ops.fastres._bn_act_train_backward_cpu(grad, x, out, scale, shift, mean, invstd, act, grad_z)


def batch_stats(x: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor],
                momentum: float) -> Tuple[Tensor, Tensor]:
    """``(mean, var)``: ``x``'s batch mean and biased variance over ``(0, 2, 3)`` in the compute
    dtype, and ``nn.BatchNorm2d``'s update of the running buffers where given (of the compute
    dtype): fastres's one-pass kernel where it takes ``x``, else ATen's
    ``torch.batch_norm_update_stats`` (fresh buffers stand for absent ones)."""
    if _native_input_reason(x) is None:
        return torch.ops.fastres._bn_stats_cpu(x, running_mean, running_var, momentum)
    if running_mean is None:
        c, ct = x.shape[1], reference.compute_dtype(x.dtype)
        running_mean, running_var = x.new_zeros(c, dtype=ct), x.new_ones(c, dtype=ct)
    return torch.batch_norm_update_stats(x, running_mean, running_var, momentum)


if NATIVE:
    @torch.library.register_fake("fastres::_bn_act_cpu")
    def _bn_act_fake(x, scale, shift, residual, activation):
        return torch.empty_like(x)

    @torch.library.register_fake("fastres::_bn_act_train_backward_cpu")
    def _train_backward_fake(grad, x, out, scale, shift, mean, invstd, activation, grad_z):
        return (torch.empty_like(x), torch.empty_like(scale), torch.empty_like(scale),
                torch.empty_like(x) if grad_z else x.new_empty(0))

    @torch.library.register_fake("fastres::_bn_act_cpu_")
    def _bn_act_inplace_fake(x, scale, shift, residual, activation):
        return None

    @torch.library.register_fake("fastres::_bn_act_train_backward_cpu_")
    def _train_backward_inplace_fake(grad, x, out, scale, shift, mean, invstd, activation, grad_z, over_x):
        return _train_backward_fake(grad, x, out, scale, shift, mean, invstd, activation, grad_z)[1:]

    @torch.library.register_fake("fastres::_bn_stats_cpu")
    def _bn_stats_fake(x, running_mean, running_var, momentum):
        ct = reference.compute_dtype(x.dtype)
        return x.new_empty(x.shape[1], dtype=ct), x.new_empty(x.shape[1], dtype=ct)


def unsupported_reason(x: Tensor, scale_dtype: torch.dtype, residual: Optional[Tensor], act: str) -> Optional[str]:
    """Why :func:`bn_act` and :func:`bn_act_backward` (ATen's BatchNorm kernels, with a ``scale``
    of ``scale_dtype``) do not stand for the reference here, or None."""
    reason = _cpu_dense_reason(x)
    if reason is not None:
        return reason
    if x.dtype in (torch.float32, torch.float64):
        return None if scale_dtype == x.dtype else "scale's dtype differs from x's"
    if x.dtype in _LOW and scale_dtype == torch.float32 and residual is None and act != "silu":
        return None
    return "a bf16/fp16 residual add or SiLU would round an intermediate"


def residual_unsupported_reason(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                                act: str) -> Optional[str]:
    """Why :func:`bn_act_residual` does not stand for the reference here, or None."""
    reason = _cpu_dense_reason(x)
    if reason is not None:
        return reason
    if x.dtype not in _LOW or scale.dtype != torch.float32 or residual is None or act == "silu":
        return "a bf16/fp16 x with an fp32 scale, a residual and ReLU or identity only"
    if residual.dtype != x.dtype or residual.stride() != x.stride():
        return "a residual of x's dtype and strides only"
    return None


# fp32 elements of bn_act_residual's intermediate per block: 1 MiB, which stays in the L2 caches
# of two cores while the block's five passes run over it.
_BLOCK = 1 << 18


def _rows(t: Tensor, channels_last: bool) -> Tensor:
    """A 4-D NCHW-contiguous or channels_last ``t`` as a 2-D view: ``[N*H*W, C]`` or ``[N*C, H*W]``."""
    n, c, h, w = t.shape
    return t.permute(0, 2, 3, 1).reshape(n * h * w, c) if channels_last else t.reshape(n * c, h * w)


def bn_act_residual(x: Tensor, scale: Tensor, shift: Tensor, residual: Tensor, act: str) -> Tensor:
    """:func:`fastres.reference.bn_act` for a bf16/fp16 ``x`` with a residual, in the
    reference's fp32 roundings (the product, the shift, the residual add, one rounding
    to ``x``'s dtype): per block of rows, the fp32 product of the promoted ``x`` (``x``
    converts exactly), two in-place adds, the in-place activation (NaN propagates, as
    ``torch.relu``), the copy into the output, in ``x``'s memory format. The blocks keep
    the fp32 intermediate in cache (:data:`_BLOCK`): each full-size tensor is read or
    written once, where the same five passes over whole tensors move an fp32 tensor
    through memory eight times."""
    out = torch.empty_like(x)
    cl = not x.is_contiguous()  # then channels_last (residual_unsupported_reason)
    xs, rs, outs = (_rows(t, cl) for t in (x, residual, out))
    n = x.shape[0]
    scale, shift = (v.view(1, -1) if cl else v.repeat(n).view(-1, 1) for v in (scale, shift))
    step = max(1, _BLOCK // xs.shape[1])
    buf = x.new_empty((min(step, xs.shape[0]), xs.shape[1]), dtype=torch.float32)
    for r0 in range(0, xs.shape[0], step):
        r1 = min(r0 + step, xs.shape[0])
        sc, sh = (scale, shift) if cl else (scale[r0:r1], shift[r0:r1])
        z = torch.mul(xs[r0:r1], sc, out=buf[: r1 - r0])
        z.add_(sh).add_(rs[r0:r1])
        if act == "relu":
            z.relu_()
        outs[r0:r1].copy_(z)
    return out


def _unit_stats(scale: Tensor) -> Tuple[Tensor, Tensor]:
    """The running mean 0 and variance 1 that make BatchNorm's ``weight`` and ``bias`` the scale and shift."""
    c = scale.shape[0]
    return scale.new_zeros(c), scale.new_ones(c)


def _pre_activation(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], stats) -> Tensor:
    """``x * scale[c] + shift[c] (+ residual)`` in ``x``'s dtype and memory format."""
    z = torch.batch_norm(x, scale, shift, *stats, False, 0.0, 0.0, False)
    return z if residual is None else z.add_(residual)


def _activate_(z: Tensor, act: str) -> Tensor:
    if act == "relu":
        return z.relu_()
    if act == "silu":
        return torch.nn.functional.silu(z, inplace=True)
    return z


def bn_act(x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], act: str) -> Tensor:
    """:func:`fastres.reference.bn_act`."""
    return _activate_(_pre_activation(x, scale, shift, residual, _unit_stats(scale)), act)


def bn_act_backward(
    grad: Tensor, x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], act: str,
    residual_grad: bool, output: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`fastres.reference.bn_act_backward`."""
    stats = _unit_stats(scale)
    z = _pre_activation(x, scale, shift, residual, stats)
    if act == "silu":
        gz = torch.ops.aten.silu_backward(grad, z)
        y = _activate_(z, act) if output else None
    else:
        y = _activate_(z, act)
        gz = torch.ops.aten.threshold_backward(grad, y, 0) if act == "relu" else grad
    grad_x, grad_scale, grad_shift = torch.ops.aten.native_batch_norm_backward(
        gz, x, scale, *stats, None, None, False, 0.0, [True, True, True]
    )
    empty = x.new_empty(0)
    return (
        grad_x,
        gz if residual_grad else empty,
        grad_scale.to(scale.dtype),
        grad_shift.to(shift.dtype),
        y if output else empty,
    )

