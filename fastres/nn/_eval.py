"""The eval unit: conv -> BN with running statistics (-> + residual) -> activation as one
``fastres.ops`` call on the module's prepared forms (``fastres/nn/_prepared.py``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import _tune, ops, reference
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
    weight); ``low``: the autocast dtype. A call like the previous one of the module (same
    sources, same :func:`_signature`) reruns its plan: the implementation and form it used,
    without validating and dispatching again (on the devices whose choice is not tuned per
    shape; a plan lives in the cache and is dropped with it)."""
    stride, padding, dilation, groups = conv_geometry(conv)
    x, residual = cast(x, low), cast(residual, low)
    weight = conv.weight
    wdtype = weight.dtype if low is None or weight.dtype == torch.float64 else low
    if cache is None:
        scale, shift = eval_scale_shift(bn, conv.bias, reference.compute_dtype(x.dtype))
        return ops.run_conv_bn_act(x, cast(weight, low), scale, shift, residual, stride, padding, dilation, groups,
                                   act, backend)
    sources = (weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, conv.bias)
    stamp = cache.stamp(sources, x)  # one validity stamp for this call's forms
    signature = None if stamp is None else _signature(stamp, x, residual, act, backend, wdtype, bn)
    plan = cache.plans.get(slot)
    if signature is not None and plan is not None and plan[0] == signature and all(
            a is b for a, b in zip(plan[1], sources)):
        impl, form, (w, scale, shift), geometry = plan[2:]
        return impl.run(form, x, w, scale, shift, residual, *geometry, act)
    scale, shift = cache.scale_shift(slot, bn, conv.bias, x, sources, stamp)
    prepared = cache.forms(slot, sources, (float(bn.eps),), weight, x, stamp)
    w = cache.kernel_weight(slot, weight, wdtype, x)
    out = ops.run_conv_bn_act(x, w, scale, shift, residual, stride, padding, dilation, groups, act, backend, prepared)
    if signature is not None and prepared.used is not None and x.device.type not in _tune.TUNED_DEVICE_TYPES:
        cache.plans[slot] = (signature, sources, *prepared.used, (w, scale, shift),
                             ([stride[0], stride[1]], [padding[0], padding[1]], [dilation[0], dilation[1]], groups))
    return out


def _signature(stamp: tuple, x: Tensor, residual: Optional[Tensor], act: str, backend: Optional[str],
               wdtype: torch.dtype, bn: _BatchNorm) -> tuple:
    """Everything the validation and the registry's choice of a call read besides the sources:
    a call with the same signature (and the same source tensors) runs the same implementation on
    the same prepared form, so the module's plan skips both."""
    r = None if residual is None else (residual.shape, residual.stride(), residual.dtype, residual.requires_grad)
    return (stamp, type(x), x.shape, x.stride(), x.dtype, x.device, x.requires_grad, r, act, backend, wdtype,
            float(bn.eps), torch.is_grad_enabled())
