"""The eval unit: conv -> BN with running statistics (-> + residual) -> activation as one
``fastres.ops`` call on the module's prepared forms (``fastres/nn/_prepared.py``)."""
from __future__ import annotations

import operator
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import _tune, ops, reference
from fastres._tracing import is_tracing
from fastres.nn._casting import cast
from fastres.nn._fusability import conv_geometry
from fastres.nn._prepared import PreparedCache, eval_scale_shift


def eval_unit(
    cache: Optional[PreparedCache], slot: str, x: Tensor, conv: nn.Conv2d, bn: _BatchNorm, act: str,
    residual: Optional[Tensor], backend: Optional[str], low: Optional[torch.dtype],
) -> Tensor:
    """``act(bn(conv(x)) (+ residual))`` with running statistics: one ``conv_bn_act`` on ``cache``'s
    ``scale_shift`` and ``weight`` forms and the prepared form of the implementation the registry
    selects (on CPU inference: oneDNN's folded, prepacked weight; for the kernels: the KRSC
    weight); ``low``: the autocast dtype. A call like the module's previous one reruns its
    :class:`CallPlan` instead of validating and dispatching again."""
    x, residual = cast(x, low), cast(residual, low)
    weight = _member(conv, "weight")
    sources = (weight, _member(bn, "weight"), _member(bn, "bias"), _member(bn, "running_mean"),
               _member(bn, "running_var"), _member(conv, "bias"))
    wdtype = weight.dtype if low is None or weight.dtype == torch.float64 else low
    if cache is not None:
        plan = cache.plans.get(slot)
        if plan is not None and not is_tracing():  # (a traced graph holds the reference's ops)
            key = _call_key(x, residual, act, backend, wdtype, bn)
            if plan.matches(sources, key):
                return plan.run(x, residual, act)
    stride, padding, dilation, groups = conv_geometry(conv)
    if cache is None:
        scale, shift = eval_scale_shift(bn, conv.bias, reference.compute_dtype(x.dtype))
        return ops.run_conv_bn_act(x, cast(weight, low), scale, shift, residual, stride, padding, dilation, groups,
                                   act, backend)
    stamp = cache.stamp(sources, x)  # one validity stamp for this call's forms
    scale, shift = cache.scale_shift(slot, bn, conv.bias, x, sources, stamp)
    prepared = cache.forms(slot, sources, (float(bn.eps),), weight, x, stamp)
    w = cache.kernel_weight(slot, weight, wdtype, x)
    out = ops.run_conv_bn_act(x, w, scale, shift, residual, stride, padding, dilation, groups, act, backend, prepared)
    if stamp is not None and prepared.used is not None and x.device.type not in _tune.TUNED_DEVICE_TYPES:
        geometry = ([stride[0], stride[1]], [padding[0], padding[1]], [dilation[0], dilation[1]], groups)
        cache.plans[slot] = CallPlan(sources, _call_key(x, residual, act, backend, wdtype, bn), *prepared.used,
                                     (w, scale, shift), geometry)
    else:
        cache.plans.pop(slot, None)
    return out


def _member(m: nn.Module, name: str) -> Optional[Tensor]:
    """``getattr(m, name)`` for a parameter or buffer, without ``Module.__getattr__``'s lookups."""
    for d in (m._parameters, m._buffers):
        if name in d:
            return d[name]
    return getattr(m, name)


def _call_key(x: Tensor, residual: Optional[Tensor], act: str, backend: Optional[str], wdtype: torch.dtype,
              bn: _BatchNorm) -> tuple:
    """Everything the validation and the registry's choice of a call read besides the sources."""
    r = None if residual is None else (type(residual), residual.shape, residual.stride(), residual.dtype,
                                       residual.device, residual.requires_grad)
    return (type(x), x.shape, x.stride(), x.dtype, x.device, x.requires_grad,
            torch._C._functorch.is_functorch_wrapped_tensor(x), r, act, backend, wdtype, bn.eps,
            torch.is_inference_mode_enabled(), torch.is_grad_enabled())


_VERSION = operator.attrgetter("_version")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


class CallPlan:
    """The implementation, prepared form and arguments of a module's last call (on the devices
    whose choice is not tuned per shape). A call with the same :func:`_call_key`, on the same
    source tensors with unchanged data_ptr and version counters (outside tracing), runs the same
    implementation on the same form, so it reruns them directly. Lives in the module's
    :class:`PreparedCache` and is dropped with it."""

    __slots__ = ("sources", "tracked", "versioned", "ptrs", "versions", "key", "impl", "form", "tensors", "geometry")

    def __init__(self, sources: tuple, key: tuple, impl, form, tensors: tuple, geometry: tuple) -> None:
        self.sources = sources
        self.tracked = tuple(t for t in sources if t is not None)
        self.versioned = tuple(t for t in self.tracked if not t.is_inference())  # inference tensors have none
        self.ptrs = tuple(t.data_ptr() for t in self.tracked)
        self.versions = tuple(t._version for t in self.versioned)
        self.key, self.impl, self.form = key, impl, form
        self.tensors, self.geometry = tensors, geometry  # (weight, scale, shift); (stride, padding, dilation, groups)

    def matches(self, sources: tuple, key: tuple) -> bool:
        return (
            key == self.key
            and all(map(operator.is_, sources, self.sources))
            and tuple(map(Tensor.data_ptr, self.tracked)) == self.ptrs
            and tuple(map(_VERSION, self.versioned)) == self.versions
            and not (key[-1] and any(map(_REQUIRES_GRAD, self.tracked)))
        )

    def run(self, x: Tensor, residual: Optional[Tensor], act: str) -> Tensor:
        w, scale, shift = self.tensors
        return self.impl.run(self.form, x, w, scale, shift, residual, *self.geometry, act)
