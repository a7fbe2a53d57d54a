"""Training units: conv -> BN with batch statistics (-> + residual) -> activation.

A unit runs ``F.conv2d`` (on the CPU for channels_last inputs oneDNN's convolution op:
``fastres._onednn.conv2d``); the conv output's batch mean and biased variance in
fp32 with the running-statistics update in one call (:func:`_batch_stats`: on the
CPU fastres's one-pass kernel, else BatchNorm's own statistics kernel); and one
``fastres.ops.bn_act`` for normalize + residual + activation with ``scale =
weight * invstd`` and ``shift = bias - mean * scale``, as ATen's BatchNorm
computes them (on the CPU the kernels that op runs there, called directly:
:func:`_bn_act`). The
backward is ``nn.BatchNorm2d``'s: the activation's backward, then one
``native_batch_norm_backward`` in training mode from the kept conv output ``y``
and the saved mean and invstd (the gradients of ``y``, the BN weight and bias,
the batch statistics' own share included). Running statistics and gradients are
``nn.BatchNorm2d``'s.

Each unit is one autograd function. Memory: a unit whose output only feeds the
next unit's conv (``defer=True``, :class:`_ConvBNActDeferred`) returns a
:class:`PendingBN` whose activation the next unit's conv takes without saving
it: the next unit's function differentiates the pending BN, keeps ``y`` and
recomputes the activation in its backward, for its conv's gradients and the
activation's backward. The other units (:class:`_ConvBNAct`) keep ``y``, or
with ``memory="min"`` (``fastres.set_training_memory``) keep no ``y`` and
recompute the conv in the backward. docs/models.md has the byte counts.

The autograd functions take ``ctx`` in ``forward`` (no ``setup_context``):
``Function.apply`` then binds no signature per call (~30-80 us each), and
they do not materialize zero gradients for their non-differentiable outputs.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import _conv, _cpu_bn, _onednn, backends, ops, reference
from fastres.nn._casting import cast
from fastres.nn._fusability import conv_geometry


class BatchNormState(NamedTuple):
    """A BN with batch statistics as its consumer applies and differentiates it:
    ``act(y * scale + shift)`` with ``scale = weight * invstd``, ``shift = bias - mean *
    scale``, over the kept conv output ``y``. All fp32 (fp64 for fp64) per-channel
    vectors without gradient: the BN's weight and bias travel as autograd inputs.
    ``kernels``: which CPU kernels apply and differentiate it (:func:`_kernels`)."""

    mean: Tensor
    invstd: Tensor
    scale: Tensor
    shift: Tensor
    eps: float
    activation: str
    kernels: str


class PendingBN:
    """A training unit's ``act(bn(y))``, not differentiable yet.

    A training unit (:func:`train_unit` with ``defer=True``) whose output only
    feeds the next unit's conv returns this instead of the activation: the next
    unit's autograd function (:class:`_ConvBNActDeferred` or :class:`_ConvBNAct`)
    takes the activation ``a`` (computed by this unit, without gradient) for its
    conv and differentiates this BN itself; it keeps ``y`` for backward instead
    of the activation and recomputes the activation there, so the unit costs one
    full-size tensor instead of two.
    """

    __slots__ = ("y", "a", "state", "weight", "bias")

    def __init__(self, y: Tensor, a: Tensor, state: BatchNormState, weight: Optional[Tensor],
                 bias: Optional[Tensor]) -> None:
        self.y, self.a, self.state, self.weight, self.bias = y, a, state, weight, bias

    def take_activation(self) -> Optional[Tensor]:
        """The activation for the consumer's conv, released here so that it lives no longer than
        that conv (None once taken: a second consumer recomputes it)."""
        a, self.a = self.a, None
        return a

    def materialize(self, backend: Optional[str]) -> Tensor:
        return _BNAct.apply(self.y, self.weight, self.bias, None, self.state, backend, self.take_activation())


def materialize(x, backend: Optional[str]) -> Tensor:
    """``x`` as a tensor (a :class:`PendingBN` applied)."""
    return x.materialize(backend) if isinstance(x, PendingBN) else x


def _state(mean: Tensor, invstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float,
           act: str, kernels: str) -> BatchNormState:
    """The :class:`BatchNormState` of batch statistics ``mean``, ``invstd``."""
    with torch.no_grad():
        ct = mean.dtype
        scale = invstd if weight is None else invstd * weight.to(ct)
        shift = -mean * scale if bias is None else torch.addcmul(bias.to(ct), mean, scale, value=-1)
    return BatchNormState(mean, invstd, scale, shift, eps, act, kernels)


def _bn_backward(gz: Tensor, y: Tensor, state: BatchNormState, weight: Optional[Tensor],
                 need: Tuple[bool, bool, bool]):
    """``(grad_y, grad_weight, grad_bias)`` of ``(y - mean) * invstd * weight + bias`` with the
    batch statistics of ``y``, given ``gz``: ``nn.BatchNorm2d``'s backward (the grads
    not in ``need`` are None, as are those of an absent ``weight``)."""
    if not any(need):
        return None, None, None
    w = None if weight is None else weight.to(state.mean.dtype)
    mask = [need[0], need[1] and w is not None, need[2] and w is not None]
    gy, gw, gb = torch.ops.aten.native_batch_norm_backward(
        gz, y, w, None, None, state.mean, state.invstd, True, state.eps, mask)
    return (
        gy if need[0] else None,
        gw.to(weight.dtype) if mask[1] else None,
        gb.to(weight.dtype) if mask[2] else None,
    )


def _bn_act_backward(grad: Tensor, y: Tensor, state: BatchNormState, act: str, residual: Optional[Tensor],
                     out: Optional[Tensor], weight: Optional[Tensor], need: Tuple[bool, bool, bool],
                     residual_grad: bool, backend: Optional[str], reuse: str = ""):
    """``(grad_y, grad_weight, grad_bias, grad_z)`` of ``act(z)``, ``z = (y - mean) * invstd *
    weight + bias (+ residual)`` with the batch statistics of ``y``, given ``grad``:
    the activation's backward (from the output ``out`` where the unit kept it) and
    ``nn.BatchNorm2d``'s (:func:`_bn_backward`); ``grad_z`` (the residual's gradient) if
    ``residual_grad``. fastres's CPU kernels (``state.kernels == "native"``) run both in
    one backward of two passes, recomputing ReLU's mask from ``y`` without a residual,
    and write ``grad_y`` over ``grad`` or ``y`` where ``reuse`` names it (the caller's own,
    no longer needed: :func:`fastres._cpu_bn.bn_act_train_backward`)."""
    if state.kernels == "native" and (need[0] or residual_grad):
        gy, gw, gb, gz = _cpu_bn.bn_act_train_backward(
            grad, y, out if act == "relu" else None, state.scale, state.shift, state.mean, state.invstd, act,
            residual_grad, reuse if need[0] else "")
        has_w = weight is not None
        return (gy if need[0] else None, gw.to(weight.dtype) if need[1] and has_w else None,
                gb.to(weight.dtype) if need[2] and has_w else None, gz if residual_grad else None)
    gz = _act_backward(grad, y, state, act, residual, out, backend)
    return _bn_backward(gz, y, state, weight, need) + (gz if residual_grad else None,)


def _bn_act(y: Tensor, state: BatchNormState, residual: Optional[Tensor], act: str, backend: Optional[str],
            reuse_y: bool = False) -> Tensor:
    """``act(y * scale + shift (+ residual))`` of ``state`` (``act`` may differ from its own);
    with fastres's CPU kernels written over ``y`` if ``reuse_y`` (the caller's, no longer needed)."""
    if state.kernels == "native":  # what ops.bn_act runs here, without its dispatch
        return _cpu_bn.bn_act_native(y, state.scale, state.shift, residual, act, reuse_y)
    if state.kernels == "batchnorm":
        return _cpu_bn.bn_act(y, state.scale, state.shift, residual, act)
    return ops.bn_act(y, state.scale, state.shift, residual, act, backend=backend)


def _apply(src: Tensor, state: Optional[BatchNormState], backend: Optional[str], act: Optional[str] = None) -> Tensor:
    """``src`` itself, or ``act(src * scale + shift)`` of the previous unit's BN (``act``
    overrides its activation)."""
    if state is None:
        return src
    return _bn_act(src, state, None, state.activation if act is None else act, backend)


def _kernels(y: Tensor, residual: Optional[Tensor], act: str, backend: Optional[str]) -> str:
    """The CPU kernels that ``fastres.ops.bn_act`` would run here (``fastres._cpu_bn``) and that
    :func:`_bn_act` then calls without the op's dispatch: ``"native"`` (fastres's, which
    :func:`_bn_act_backward` also differentiates with), ``"batchnorm"`` (ATen's BatchNorm
    kernels), or ``""`` (the op's dispatch)."""
    if backends.resolve("fastres.nn", backend, y.device, "bn_act") != "torch":
        return ""
    ct = reference.compute_dtype(y.dtype)
    if _cpu_bn.native_reason(y, ct, residual, act) is None:
        return "native"
    return "batchnorm" if _cpu_bn.unsupported_reason(y, ct, residual, act) is None else ""


def _bn_forward(y: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], bn: _BatchNorm,
                residual: Optional[Tensor], act: str, backend: Optional[str], n: int, reuse_y: bool = False):
    """``(act(bn(y) (+ residual)), state)`` with the batch statistics of ``y`` (``bn``'s
    running statistics updated; ``weight``, ``bias``: its parameters): the statistics
    (:func:`_batch_stats`), then one BN-activation (:func:`_bn_act`, over ``y`` if
    ``reuse_y``), the very ops that recompute it in the backward (bit-identical)."""
    var, mean = _batch_stats(y, bn, n)
    state = _state(mean, torch.rsqrt(var + bn.eps), weight, bias, bn.eps, act, _kernels(y, residual, act, backend))
    return _bn_act(y, state, residual, act, backend, reuse_y), state


def _batch_stats(t: Tensor, bn: _BatchNorm, n: int) -> Tuple[Tensor, Tensor]:
    """The biased ``var`` and ``mean`` of ``t`` over ``(0, 2, 3)`` in fp32 (fp64 for fp64),
    and ``nn.BatchNorm2d``'s running-statistics update of ``bn`` from them (``n`` values
    per channel).

    :func:`fastres._cpu_bn.batch_stats` (fastres's one-pass CPU kernel, else
    ``torch.batch_norm_update_stats``, BatchNorm's own statistics kernel): given
    ``bn``'s running buffers (of the compute dtype) and momentum, it updates them
    as ``nn.BatchNorm2d`` does; without them only the statistics, for the update by
    hand (a cumulative average, ``momentum=None``, without a host sync; buffers of
    another dtype)."""
    ct = reference.compute_dtype(t.dtype)
    tracked = bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None
    if tracked and bn.momentum is not None and bn.running_mean.dtype == ct and bn.running_var.dtype == ct:
        with torch.no_grad():
            mean, var = _cpu_bn.batch_stats(t, bn.running_mean, bn.running_var, bn.momentum)
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.add_(1)
        return var, mean
    mean, var = _cpu_bn.batch_stats(t, None, None, 0.0)
    if tracked:
        _update_running_stats(bn, var, mean, n)
    return var, mean


def _conv_in_out(src, a, prev: Optional[BatchNormState], weight, bias, conv_args, backend,
                 low) -> Tuple[Tensor, Tensor]:
    """``(input, output)`` of the unit's conv: the input is ``a``, the previous unit's
    activation if it came with ``src``, else ``src`` with the previous unit's BN applied (a
    backward that recomputes them runs these same ops)."""
    if a is None:
        a = _apply(src, prev, backend)
    return a, _onednn.conv2d(a, cast(weight, low), cast(bias, low), *conv_args)


def _save_conv(ctx, prev, conv_args, backend, low, bias) -> None:
    """What :func:`_conv_backward` reads from ``ctx`` besides the saved tensors."""
    ctx.prev, ctx.conv_args, ctx.backend, ctx.low = prev, conv_args, backend, low
    ctx.bias_sizes = None if bias is None else list(bias.shape)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _conv_backward(ctx, dy, src, weight_p, weight, a, need):
    """Gradients ``(src, weight_p, bias_p, weight, bias)`` of ``conv2d(a, weight, bias)``
    with ``a = src`` or ``a = act(bn(src))`` (``ctx.prev``: the BN with the batch
    statistics of ``src``, parameters ``weight_p``/``bias_p``), given ``dy``; ``need``
    says which.

    ``a`` is the recomputed activation if the caller has it, else it is
    recomputed here (for ReLU, outside fastres's CPU kernels, also what the
    activation's backward reads), so that one ``convolution_backward`` gives both
    of the conv's gradients. ``weight`` is the
    parameter: under autocast its low-precision copy is made again here rather
    than kept from the forward (autograd through ``F.conv2d`` keeps it: a model's
    size of extra memory in bf16 training).
    """
    prev = ctx.prev
    w = cast(weight, ctx.low)
    need_a = need[0] if prev is None else any(need[:3])  # the gradient of the conv's input
    native = prev is not None and prev.kernels == "native"  # ReLU's mask recomputed there, from src
    z = None  # SiLU's input, for its backward
    if prev is not None and prev.activation == "silu" and need_a:
        z = _apply(src, prev, ctx.backend, "identity")
        if a is None and need[3]:
            a = F.silu(z)
    elif prev is not None and a is None and (need[3] or need_a and prev.activation == "relu" and not native):
        a = _apply(src, prev, ctx.backend)
    # The input gradient needs only the input's shape and layout: those of src.
    grad_a, grad_w, grad_b = _conv.backward(dy, src if a is None else a, w, ctx.bias_sizes, *ctx.conv_args,
                                            [need_a, need[3], need[4]])
    grad_src = grad_wp = grad_bp = None
    if prev is None:
        grad_src = grad_a
    elif need_a and native:
        del a
        grad_src, grad_wp, grad_bp, _ = _bn_act_backward(grad_a, src, prev, prev.activation, None, None, weight_p,
                                                         need[:3], False, ctx.backend, reuse="grad")
    elif need_a:
        if prev.activation == "relu":
            # in place: grad_a is the conv backward's fresh tensor (a full-size allocation fewer)
            gz = torch.ops.aten.threshold_backward.grad_input(grad_a, a, 0, grad_input=grad_a)
        elif prev.activation == "silu":
            gz = torch.ops.aten.silu_backward(grad_a, z)
        else:
            gz = grad_a
        del grad_a, a, z
        grad_src, grad_wp, grad_bp = _bn_backward(gz, src, prev, weight_p, need[:3])
    return (
        grad_src if need[0] else None,
        grad_wp if need[1] else None,
        grad_bp if need[2] else None,
        None if grad_w is None else grad_w.to(weight.dtype),
        None if grad_b is None else grad_b.to(ctx.bias_dtype),
    )


class _ConvBNActDeferred(torch.autograd.Function):
    """A deferred training unit (its output only feeds the next unit's conv): its conv,
    BN with batch statistics and activation, ``(y, a, state)``, differentiable in ``y`` only.

    Forward, with ``src`` itself or, when the input is the previous unit's pending
    BN (``prev``, parameters ``weight_p``/``bias_p``), its activation
    (``a_prev``, or recomputed from ``src``) as the conv's input::

        y = conv2d(input, weight, bias)
        a = act(bn(y))  (BN weight ``bn_weight``, bias ``bn_bias``; batch statistics of y)

    and ``bn``'s running-statistics update (:func:`_bn_forward`). ``a`` and the
    :class:`BatchNormState` carry no gradient: the next unit's conv takes ``a``
    and its function differentiates this BN as a whole (:func:`_bn_backward`),
    from ``y``.

    Saved for backward: ``src`` (the previous unit's ``y``, which nothing else
    keeps, or the block input, kept by its every consumer anyway); the previous
    activation is not kept but recomputed in the backward. The gradients of
    ``src``, the previous BN's weight and bias are ``nn.BatchNorm2d``'s.
    """

    @staticmethod
    def forward(ctx, src, weight_p, bias_p, weight, bias, bn_weight, bn_bias, a_prev, prev, conv_args, act, backend,
                low, bn, n):
        _, y = _conv_in_out(src, a_prev, prev, weight, bias, conv_args, backend, low)
        a, state = _bn_forward(y, bn_weight, bn_bias, bn, None, act, backend, n)
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(a)
        ctx.save_for_backward(src, weight_p, weight)
        _save_conv(ctx, prev, conv_args, backend, low, bias)
        return y, a, state

    @staticmethod
    def backward(ctx, grad_y, _grad_a, _grad_state):
        if grad_y is None:  # zero gradients are not materialized
            return (None,) * 15
        src, weight_p, weight = ctx.saved_tensors
        return _conv_backward(ctx, grad_y, src, weight_p, weight, None, ctx.needs_input_grad[:5]) + (None,) * 10


def _act_backward(grad, y, state: BatchNormState, act: str, residual, out, backend) -> Tensor:
    """The gradient of ``z = bn(y) (+ residual)`` given that of ``act(z)``: from the
    output ``out`` for ReLU where it was kept, else from ``z`` recomputed."""
    if act == "identity":
        return grad
    if act == "relu":
        if out is None:
            out = _bn_act(y, state, residual, "relu", backend)
        return torch.ops.aten.threshold_backward(grad, out, 0)
    return torch.ops.aten.silu_backward(grad, _bn_act(y, state, residual, "identity", backend))


def _saved_output(out: Tensor, act: str, residual: Optional[Tensor]) -> Optional[Tensor]:
    """What of its output a unit keeps for the activation's backward: for ReLU after a
    residual add the output, as ``torch.relu`` keeps it (the next conv keeps it anyway);
    without a residual nothing (the kept ``y`` gives the activation's input: a unit
    followed by a pooling keeps nothing the pooling does not need)."""
    return out if act == "relu" and residual is not None else None


class _BNAct(torch.autograd.Function):
    """``act(bn(y) (+ residual))`` with the batch statistics of ``y`` in ``state`` (which
    carry no gradient: the backward is the whole of ``nn.BatchNorm2d``'s): a pending
    BN that is used other than by the next unit's conv (:meth:`PendingBN.materialize`),
    whose activation ``a``, where the unit still holds it, is the output.

    Saved: ``y``, and the output (:func:`_saved_output`) or, for SiLU, the
    residual (to recompute its input).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, residual, state, backend, a):
        act = state.activation
        out = a if a is not None and residual is None else _bn_act(y, state, residual, act, backend)
        ctx.save_for_backward(y, weight, residual if act == "silu" else None, _saved_output(out, act, residual))
        ctx.state, ctx.backend, ctx.has_residual = state, backend, residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, residual, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        state = ctx.state
        return _bn_act_backward(grad_out, y, state, state.activation, residual, out, weight, need[:3],
                                ctx.has_residual and need[3], ctx.backend) + (None, None, None)


class _BNReLUMaxPool(torch.autograd.Function):
    """``max_pool2d(relu(bn(y)))`` of a pending BN with ReLU (a ResNet stem in training):
    the pooling's output, differentiable in ``y`` and the BN's weight and bias.

    Every pooled value is the ReLU output at its index (a window's maximum; the
    padding is -inf), so the ReLU's backward runs on the pooled gradient and
    output, before the pooling's backward scatters it: the mask ``out > 0`` is
    ``torch.relu``'s at each index, a quarter of the pass over the full-size
    activation that the unit's own backward would recompute. Saved: ``y``, the
    indices and the output (which the next conv keeps anyway).
    """

    @staticmethod
    def forward(ctx, y, weight, bias, a, state, backend, kernel_size, stride, padding, dilation, ceil_mode):
        if a is None:
            a = _apply(y, state, backend)
        out, indices = torch.ops.aten.max_pool2d_with_indices(a, kernel_size, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(y, weight, out, indices)
        ctx.state, ctx.args = state, (kernel_size, stride, padding, dilation, ceil_mode)
        return out

    @staticmethod
    def backward(ctx, grad):
        y, weight, out, indices = ctx.saved_tensors
        masked = torch.ops.aten.threshold_backward(grad, out, 0)
        # the pooling input's shape and layout are y's (never read)
        grad_bn = torch.ops.aten.max_pool2d_with_indices_backward(masked, y, *ctx.args, indices)
        del masked
        return _bn_act_backward(grad_bn, y, ctx.state, "identity", None, None, weight, ctx.needs_input_grad[:3],
                                False, None, reuse="grad")[:3] + (None,) * 8


def relu_max_pool(x: PendingBN, backend: Optional[str], kernel_size, stride, padding, dilation, ceil_mode) -> Tensor:
    """``max_pool2d`` of a pending BN with ReLU (:class:`_BNReLUMaxPool`)."""
    return _BNReLUMaxPool.apply(x.y, x.weight, x.bias, x.take_activation(), x.state, backend, kernel_size, stride,
                                padding, dilation, ceil_mode)


class _ConvBNAct(torch.autograd.Function):
    """A training unit whose output is not deferred, ``act(bn(conv2d(input, weight, bias)) (+ residual))``,
    with the conv's input as in :class:`_ConvBNActDeferred`.

    Saved: ``src`` (the previous unit's ``y`` or the input, kept anyway), the
    per-channel statistics, the output (:func:`_saved_output`) or, for SiLU, the
    residual; and the conv output ``y`` unless ``keep_y`` is False
    (``training_memory="min"``): the backward then recomputes the conv input and
    the conv (bit-identical: the same ops on the same values) before the BN and
    conv backwards, and the unit keeps no full-size tensor of its own. The running
    statistics are updated in the forward, before anything is saved:
    torch.utils.checkpoint's recomputation stops once the last tensor of the
    region is saved again, and this unit may save it (torchvision's BN updates
    its statistics before its ReLU saves).
    """

    @staticmethod
    def forward(ctx, src, weight_p, bias_p, weight, bias, bn_weight, bn_bias, residual, a_prev, prev, conv_args, act,
                backend, low, bn, n, keep_y):
        _, y = _conv_in_out(src, a_prev, prev, weight, bias, conv_args, backend, low)
        out, state = _bn_forward(y, bn_weight, bn_bias, bn, residual, act, backend, n, reuse_y=not keep_y)
        ctx.save_for_backward(src, weight_p, weight, bias, bn_weight, y if keep_y else None,
                              residual if act == "silu" else None, _saved_output(out, act, residual))
        _save_conv(ctx, prev, conv_args, backend, low, bias)
        ctx.state, ctx.has_residual = state, residual is not None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        src, weight_p, weight, bias, bn_weight, y, residual, out = ctx.saved_tensors
        need = ctx.needs_input_grad
        a = None
        recomputed = y is None
        if recomputed:  # the forward's conv input and output again
            a, y = _conv_in_out(src, None, ctx.prev, weight, bias, ctx.conv_args, ctx.backend, ctx.low)
        state = ctx.state
        dy, grad_bn_w, grad_bn_b, grad_res = _bn_act_backward(
            grad_out, y, state, state.activation, residual, out, bn_weight, (True, need[5], need[6]),
            ctx.has_residual and need[7], ctx.backend, "x" if recomputed else "")
        del y
        return _conv_backward(ctx, dy, src, weight_p, weight, a, need[:5]) + (grad_bn_w, grad_bn_b, grad_res) + (
            None,) * 9


def train_unit(
    x, conv: nn.Conv2d, bn: _BatchNorm, fused_act: str, after: Optional[nn.Module], residual: Optional[Tensor],
    backend: Optional[str], low: Optional[torch.dtype], defer: bool, memory: str,
):
    """A conv -> BN (batch statistics) -> act (+ residual) unit in training (module docstring);
    ``fused_act``, ``after``: the epilogue's activation and the module run after it (``fastres.nn._fusability.epilogue``)."""
    weight, bias = conv.weight, conv.bias  # cast to low inside the units (:func:`_conv_backward`)
    conv_args = conv_geometry(conv)
    if torch.compiler.is_compiling():
        # Under torch.compile the unit is the stock modules' ops: the compiler fuses them and its
        # partitioner chooses what to keep for backward (torch 2.11's AOT autograd computes wrong
        # gradients through these autograd functions: tests/test_training_memory.py).
        z = bn(F.conv2d(cast(materialize(x, backend), low), cast(weight, low), cast(bias, low), *conv_args))
        out = reference.activation(z if residual is None else z + residual, fused_act)
        return out if after is None else after(out)
    if isinstance(x, PendingBN):
        src, prev, weight_p, bias_p, a_prev = x.y, x.state, x.weight, x.bias, x.take_activation()
    else:
        src, prev, weight_p, bias_p, a_prev = cast(x, low), None, None, None, None
    n = _values_per_channel(src, weight, conv_args)
    if defer and residual is None and after is None:
        y, a, state = _ConvBNActDeferred.apply(src, weight_p, bias_p, weight, bias, bn.weight, bn.bias, a_prev, prev,
                                            conv_args, fused_act, backend, low, bn, n)
        return PendingBN(y, a, state, bn.weight, bn.bias)
    residual = cast(residual, src.dtype if low is not None else None)
    out = _ConvBNAct.apply(src, weight_p, bias_p, weight, bias, bn.weight, bn.bias, residual, a_prev, prev, conv_args,
                           fused_act, backend, low, bn, n, memory != "min")
    return out if after is None else after(out)


def _values_per_channel(src: Tensor, weight: Tensor, conv_args) -> int:
    """``N * H_out * W_out`` of the conv; ``nn.BatchNorm2d``'s error if it is 1 or less."""
    out = _conv.out_shape(src.shape, weight.shape, *conv_args[:3])
    n = out[0] * out[2] * out[3]
    if n <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(out)}")
    return n


def _update_running_stats(bn: _BatchNorm, var: Tensor, mean: Tensor, n: int) -> None:
    """``nn.BatchNorm2d``'s running-statistics update (``torch/nn/modules/batchnorm.py``)
    from the biased ``var`` and the ``mean`` of ``n`` values per channel."""
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average; a tensor, so no host sync
                factor = 1.0 / bn.num_batches_tracked.to(torch.float64)
        unbiased = var * (n / (n - 1))
        for buf, stat in ((bn.running_mean, mean), (bn.running_var, unbiased)):
            buf.copy_(stat * factor + buf * (1 - factor))
