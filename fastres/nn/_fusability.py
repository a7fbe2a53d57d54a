"""What ``fastres.nn`` fuses: which convolutions, norms and activations a fused op can stand for.

Fused: a plain zero-padded ``nn.Conv2d``; ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``
(not while it synchronizes batch statistics), torchvision's ``FrozenBatchNorm2d``
and timm's ``BatchNormAct2d`` / ``FrozenBatchNormAct2d`` (whose own activation joins
the epilogue); ``nn.ReLU``, ``nn.SiLU``, ``nn.Identity``. Exact classes without hooks:
a subclass or a hook may compute something else. Anything else runs as the
original modules (``fastres/nn/_fuse.py``).
"""
from __future__ import annotations

import sys
from typing import Optional, Tuple

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres._checks import check_activation

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


def has_hooks(m: nn.Module) -> bool:
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
    if name is None or has_hooks(module):
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
    if has_hooks(conv):
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
            if type(bn.drop) is not nn.Identity or has_hooks(bn.drop):
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
    if has_hooks(bn):
        return "the BatchNorm has hooks"
    return None


def uses_batch_stats(bn: nn.Module) -> bool:
    """Whether ``bn`` normalizes with batch statistics now (``nn.BatchNorm2d``'s rule; never for a frozen BN)."""
    if not isinstance(bn, _BatchNorm):
        return False
    buffers = bn._buffers  # (registered, possibly as None, by _NormBase)
    return bn.training or buffers.get("running_mean") is None or buffers.get("running_var") is None


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


def conv_geometry(conv: nn.Conv2d) -> Tuple[tuple, tuple, tuple, int]:
    """``(stride, padding, dilation, groups)`` of a fusable ``conv`` (``padding="valid"`` is zero)."""
    padding = (0, 0) if conv.padding == "valid" else tuple(conv.padding)
    return tuple(conv.stride), padding, tuple(conv.dilation), conv.groups
