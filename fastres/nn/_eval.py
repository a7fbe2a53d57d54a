"""The eval unit: conv -> BN with running statistics (-> + residual) -> activation as one
``fastres.ops`` call on the module's prepared forms (``fastres/nn/_prepared.py``)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import ops, reference
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
    weight); ``low``: the autocast dtype."""
    stride, padding, dilation, groups = conv_geometry(conv)
    x, residual = cast(x, low), cast(residual, low)
    weight = conv.weight
    wdtype = weight.dtype if low is None or weight.dtype == torch.float64 else low
    if cache is None:
        scale, shift = eval_scale_shift(bn, conv.bias, reference.compute_dtype(x.dtype))
        return ops.run_conv_bn_act(x, cast(weight, low), scale, shift, residual, stride, padding, dilation, groups,
                                   act, backend)
    scale, shift = cache.scale_shift(slot, bn, conv.bias, x)
    sources = (weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, conv.bias)
    prepared = cache.forms(slot, sources, (float(bn.eps),), weight, x)
    return ops.run_conv_bn_act(x, cache.kernel_weight(slot, weight, wdtype, x), scale, shift, residual, stride,
                               padding, dilation, groups, act, backend, prepared)

