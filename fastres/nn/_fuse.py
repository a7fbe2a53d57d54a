"""How a fastres module runs ``conv -> BN (-> + residual) -> activation``: the one entry point.

:func:`conv_bn_act` decides per call, from the submodules it is given:

* **BN with running statistics** (eval, or frozen-BN fine-tuning): one
  ``fastres.ops.conv_bn_act`` with the BN folded into fp32 ``scale``/``shift`` and
  the residual and activation in the epilogue (``fastres/nn/_eval.py``), on the
  module's prepared forms (``fastres/nn/_prepared.py``).
* **BN with batch statistics** (training): a training unit
  (``fastres/nn/_train.py``), gradients and running statistics exactly
  ``nn.BatchNorm2d``'s.
* **Anything else** (what ``fastres/nn/_fusability.py`` does not fuse): the original
  modules, ``act(bn(conv(x)) + residual)``, exactly as torchvision runs them. An
  activation module other than the fused ones runs after an ``"identity"`` epilogue.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastres.nn._casting import autocast_dtype
from fastres.nn._eval import eval_unit
from fastres.nn._fusability import bn_unfusable_reason, conv_unfusable_reason, epilogue, uses_batch_stats
from fastres.nn._prepared import PreparedCache
from fastres.nn._train import PendingBN, materialize, train_unit


def _unfused(x: Tensor, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module], residual: Optional[Tensor]) -> Tensor:
    out = bn(conv(x))
    if residual is not None:
        out = out + residual
    return out if act is None else act(out)


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

    ``x`` is a tensor or the previous unit's :class:`PendingBN`. With ``defer=True``
    a training unit without residual returns a :class:`PendingBN` for the next
    unit's conv (the caller must only feed it to :func:`conv_bn_act` or
    :func:`materialize`); otherwise a tensor.
    """
    if conv_unfusable_reason(conv) is not None or bn_unfusable_reason(bn, runtime=True) is not None:
        return _unfused(materialize(x, backend), conv, bn, act, residual)
    fused = epilogue(bn, act, residual is not None)
    if fused is None:
        return _unfused(materialize(x, backend), conv, bn, act, residual)
    fused_act, after = fused
    low = autocast_dtype(x.y if isinstance(x, PendingBN) else x)
    if uses_batch_stats(bn):
        return train_unit(x, conv, bn, fused_act, after, residual, backend, low, defer, memory)
    out = eval_unit(cache, slot, materialize(x, backend), conv, bn, fused_act, residual, backend, low)
    return out if after is None else after(out)
