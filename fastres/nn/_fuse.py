"""How a fastres module runs ``conv -> BN (-> + residual) -> activation``.

One function, :func:`conv_bn_act`, decides per call, from the submodules it is
given, what can run fused and what must run as the original modules:

* **BN with running statistics** (``bn.eval()``, the usual inference case, or
  frozen-BN fine-tuning): one ``fastres.ops.conv_bn_act`` with the BN folded
  into a per-channel fp32 ``scale``/``shift`` (``fastres.ops.bn_scale_shift``,
  plus ``scale * conv.bias`` when the conv has a bias) and the residual and
  activation in the epilogue.
* **BN with batch statistics** (``bn.train()``, or ``track_running_stats=False``):
  ``F.conv2d``, then the batch mean and biased variance in fp32
  (``torch.var_mean`` over ``(0, 2, 3)``) as ``scale = weight * rstd`` and
  ``shift = bias - mean * scale``, then one ``fastres.ops.bn_act`` for
  normalize + residual + activation (on the conv output centered on its
  detached batch mean, for an fp32-accurate backward: see
  :func:`batch_scale_shift`). Autograd flows through ``scale``/``shift``
  into ``weight``, ``bias`` and the batch statistics, which is exactly
  ``nn.BatchNorm2d``'s gradient. Running statistics are updated as
  ``nn.BatchNorm2d`` does (momentum, ``momentum=None`` as a cumulative average,
  unbiased variance, ``num_batches_tracked``), under ``no_grad``.
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
from fastres._tracing import is_tracing

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


def batch_scale_shift(bn: _BatchNorm, y: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """``bn(y)`` with batch statistics as ``(yc, scale, shift)`` with ``bn(y) == yc * scale + shift``;
    updates the running statistics.

    Same math as ``nn.BatchNorm2d`` in training: the biased variance
    normalizes, the unbiased one goes into ``running_var``; ``scale``/``shift``
    are fp32 and differentiable with respect to ``y``, ``bn.weight`` and
    ``bn.bias``.

    ``yc = y - c`` is ``y`` centered on its batch mean ``c`` (detached, in
    ``y``'s dtype), and ``shift = bias - (mean(yc)) * scale`` with
    ``mean(yc) ~ 0``. The forward value is the same as with ``y``, but the
    backward of ``bn_act`` reduces ``sum(grad * yc)`` for the gradient of
    ``scale`` instead of ``sum(grad * y)``: without the centering, the weight
    and variance gradients are ``sum(grad * y) - mean * sum(grad)``, which
    cancels catastrophically in fp32 for channels whose mean is large compared
    to their standard deviation (``nn.BatchNorm2d``'s backward reduces
    ``grad * (y - mean)`` directly). Only ``yc`` is saved for backward.
    """
    n = y.numel() // y.shape[1]
    if n <= 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(y.shape)}"
        )
    ct = compute_dtype(y.dtype)
    with torch.no_grad():
        center = torch.mean(y, dim=(0, 2, 3), dtype=ct).to(y.dtype)
    yc = y - center.view(1, -1, 1, 1)
    var, mean_c = _BatchVarMean.apply(yc)
    scale = torch.rsqrt(var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(ct)
    shift = -mean_c * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(ct)
    if bn.training and bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        _update_running_stats(bn, mean_c.detach() + center.to(ct), var.detach(), n)
    return yc, scale, shift


class _BatchVarMean(torch.autograd.Function):
    """``torch.var_mean(y.float(), dim=(0, 2, 3), correction=0)`` that saves ``y`` itself.

    ``var_mean`` of ``y.float()`` would save the fp32 copy for its backward: for
    fp16/bf16 training that is twice the activation memory ``y`` takes (which
    ``bn_act`` saves anyway). Here the fp32 copy is transient and the backward
    recomputes ``y.float() - mean`` (the same formula as autograd's).
    """

    @staticmethod
    def forward(y: Tensor) -> Tuple[Tensor, Tensor]:
        return torch.var_mean(y.to(compute_dtype(y.dtype)), dim=(0, 2, 3), correction=0)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        (y,) = inputs
        ctx.save_for_backward(y, output[1])

    @staticmethod
    def backward(ctx, grad_var: Optional[Tensor], grad_mean: Optional[Tensor]) -> Tensor:
        y, mean = ctx.saved_tensors
        n = y.numel() // y.shape[1]
        g = torch.zeros_like(mean) if grad_mean is None else grad_mean / n
        g = g.view(1, -1, 1, 1)
        if grad_var is not None:
            g = g + (grad_var * (2.0 / n)).view(1, -1, 1, 1) * (y.to(mean.dtype) - mean.view(1, -1, 1, 1))
        return g.expand(y.shape).to(y.dtype)


def _update_running_stats(bn: _BatchNorm, mean: Tensor, var: Tensor, n) -> None:
    """``nn.BatchNorm2d``'s running-statistics update (``torch/nn/modules/batchnorm.py``)."""
    with torch.no_grad():
        factor = 0.0 if bn.momentum is None else bn.momentum
        if bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
            if bn.momentum is None:  # cumulative moving average; a tensor, so no host sync
                factor = 1.0 / bn.num_batches_tracked.to(torch.float64)
        unbiased = var * (n / (n - 1))
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
    x: Tensor,
    conv: nn.Module,
    bn: nn.Module,
    act: Optional[nn.Module],
    residual: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> Tensor:
    """``act(bn(conv(x)) (+ residual))``, fused as far as the modules allow (module docstring)."""
    if conv_unfusable_reason(conv) is not None or bn_unfusable_reason(bn, runtime=True) is not None:
        return _unfused(x, conv, bn, act, residual)
    plan = epilogue(bn, act, residual is not None)
    if plan is None:
        return _unfused(x, conv, bn, act, residual)
    fused_act, post = plan
    low = _autocast_dtype(x)  # custom ops do not autocast: cast as F.conv2d would
    if uses_batch_stats(bn):
        y = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv_padding(conv), conv.dilation, conv.groups)
        yc, scale, shift = batch_scale_shift(bn, y)
        residual = _cast(residual, y.dtype if low is not None else None)
        out = ops.bn_act(yc, scale, shift, residual, fused_act, backend=backend)
    else:
        out = _eval_conv_bn_act(cache, slot, x, conv, bn, fused_act, residual, backend, low)
    return out if post is None else post(out)
