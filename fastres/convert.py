"""``fastres.convert(model)``: torchvision (and timm) ResNets to fastres modules.

Conversion swaps module *classes*, never parameters: each converted block is a
fastres block holding the very same ``conv``/``bn``/activation submodules
(and any extra submodules, in the same order), so state_dict keys, parameter
objects and outputs are unchanged. With ``inplace=False`` (the default) the
input is deep-copied first and never mutated: the result owns copies of its
parameters. With ``inplace=True`` the input's blocks are replaced in place and
the result shares every parameter with the input.

Recognized, and converted when every part of them can run fused:

* ``torchvision.models.resnet.ResNet`` -> :class:`fastres.models.ResNet`
  (its forward must be torchvision's; a modified stem, ``maxpool``,
  ``avgpool`` or ``fc`` is fine: unfusable stem parts run as they are);
* torchvision's ``BasicBlock``/``Bottleneck`` -> ``fastres.nn.BasicBlock``/``Bottleneck``;
* timm's ``BasicBlock``/``Bottleneck`` (``act1``, ``act2``... kept) ->
  ``fastres.nn.TimmBasicBlock``/``TimmBottleneck``, when their ``drop_block``,
  ``aa``, ``se`` and ``drop_path`` are absent (timm's ResNet class itself is kept).

Norms fused: ``nn.BatchNorm2d``, ``nn.SyncBatchNorm``, torchvision's
``FrozenBatchNorm2d`` (the backbone norm of its detection and segmentation
models) and timm's ``BatchNormAct2d``/``FrozenBatchNormAct2d`` with an
``nn.Identity`` ``drop`` and a fused activation (``fastres.nn._fusability.library_norms``);
a norm with its own activation right before the residual add runs unfused (reported).

A block is left as it is (and reported, with the reason) when it overrides
``forward``, has hooks, or any of its convs, norms or activations cannot be
fused: e.g. a ``GroupNorm``, a non-zero ``padding_mode``, an activation other
than ``nn.ReLU``/``nn.SiLU``/``nn.Identity``. A conv with a bias is fine (folded
into the BN shift in eval; exact in training). A model in which nothing is
converted (no recognized block: e.g. timm's ByobNet ``resnext26ts``) is
reported and warned about too.
"""
from __future__ import annotations

import copy
import dataclasses
import sys
import types
import warnings
from typing import Dict, Optional, Tuple, Type

from torch import nn

from fastres.backends import check_backend_name
from fastres.nn import _fusability
from fastres.nn.modules import TIMM_OPTIONAL, BasicBlock, Bottleneck, FusedModule, TimmBasicBlock, TimmBottleneck

__all__ = ["ConversionReport", "convert"]

MODEL = "<model>"  # the report's name for the converted model itself


@dataclasses.dataclass
class ConversionReport:
    """What :func:`convert` did, by qualified module name (``MODEL`` for the model itself).

    * ``converted``: modules replaced by fastres modules (name -> "source -> target");
    * ``unconverted``: recognized modules left as they are, with the reason;
    * ``unfused``: parts of converted modules that run as their original
      modules (correct, not fused), with the reason.
    """

    converted: Dict[str, str] = dataclasses.field(default_factory=dict)
    unconverted: Dict[str, str] = dataclasses.field(default_factory=dict)
    unfused: Dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"fastres.convert: {len(self.converted)} module(s) converted"]
        if not self.converted:
            lines[0] += (
                ": no recognized ResNet module in this model (torchvision's ResNet, BasicBlock, "
                "Bottleneck; timm's BasicBlock, Bottleneck); it runs unchanged"
            )
        for title, d in (("left unconverted", self.unconverted), ("running unfused", self.unfused)):
            if d:
                lines.append(f"{len(d)} {title}:")
                lines += [f"  {name}: {why}" for name, why in d.items()]
        return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    target: Type[FusedModule]
    convs: Tuple[str, ...]
    norms: Tuple[str, ...]
    acts: Tuple[str, ...]
    absent: Tuple[str, ...] = ()  # must be None or nn.Identity (timm's optional parts)


_TV_BASIC = _BlockSpec(BasicBlock, ("conv1", "conv2"), ("bn1", "bn2"), ("relu",))
_TV_BOTTLENECK = _BlockSpec(Bottleneck, ("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"), ("relu",))
_TIMM_BASIC = _BlockSpec(TimmBasicBlock, ("conv1", "conv2"), ("bn1", "bn2"), ("act1", "act2"), TIMM_OPTIONAL)
_TIMM_BOTTLENECK = _BlockSpec(
    TimmBottleneck, ("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"), ("act1", "act2", "act3"), TIMM_OPTIONAL
)


def _sources():
    """(class, spec) for every recognized block class of the libraries already imported."""
    out = []
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None:
        out += [(tv.BasicBlock, _TV_BASIC), (tv.Bottleneck, _TV_BOTTLENECK)]
    timm = sys.modules.get("timm.models.resnet")
    if timm is not None:
        out += [(timm.BasicBlock, _TIMM_BASIC), (timm.Bottleneck, _TIMM_BOTTLENECK)]
    return out


def _qual(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _label(name: str) -> str:
    return name or MODEL


def _source_name(cls: type) -> str:
    return f"{cls.__module__.split('.')[0]}.{cls.__qualname__}"


def _adopt(cls: Type[FusedModule], old: nn.Module, backend: Optional[str]) -> FusedModule:
    """A ``cls`` holding ``old``'s parameters, buffers and submodules (same objects,
    same order), its training flag and its public attributes."""
    new = cls.__new__(cls)
    FusedModule.__init__(new, backend)
    new.training = old.training
    new._parameters.update(old._parameters)
    new._buffers.update(old._buffers)
    new._non_persistent_buffers_set = set(old._non_persistent_buffers_set)
    new._modules.update(old._modules)
    for k, v in old.__dict__.items():
        if not k.startswith("_") and k != "training" and k not in new.__dict__:
            new.__dict__[k] = v
    return new


def _block_problems(m: nn.Module, cls: type, spec: _BlockSpec):
    """(reasons it cannot be converted, {part: why it runs unfused})."""
    problems, unfused = [], {}
    if type(m).forward is not cls.forward:
        problems.append(f"{type(m).__name__} overrides forward")
    if _fusability.has_hooks(m):
        problems.append("the block has hooks")
    for name in spec.convs:
        why = _fusability.conv_unfusable_reason(getattr(m, name))
        if why:
            problems.append(f"{name}: {why}")
    for name in spec.norms:
        why = _fusability.bn_unfusable_reason(getattr(m, name))
        if why:
            problems.append(f"{name}: {why}")
    for name in spec.acts:
        why = _fusability.activation_unfusable_reason(getattr(m, name))
        if why:
            problems.append(f"{name}: {why}")
    why = _fusability.norm_before_residual_unfusable_reason(getattr(m, spec.norms[-1]))
    if why:
        unfused[f"{spec.convs[-1]}/{spec.norms[-1]}"] = why
    for name in spec.absent:
        part = getattr(m, name, None)
        if part is not None and type(part) is not nn.Identity:
            problems.append(f"{name} is {type(part).__name__} (only None/nn.Identity is fused)")
    ds = getattr(m, "downsample", None)
    if ds is not None:
        if type(ds) is nn.Sequential and len(ds) == 2 and not _fusability.has_hooks(ds):
            why = _fusability.conv_unfusable_reason(ds[0]) or _fusability.bn_unfusable_reason(ds[1])
        else:
            why = f"{type(ds).__name__} is not Sequential(Conv2d, BatchNorm2d)"
        if why:
            unfused["downsample"] = why
    return problems, unfused


def _convert_block(m, name, cls, spec, report, backend):
    problems, unfused = _block_problems(m, cls, spec)
    if problems:
        report.unconverted[_label(name)] = f"{_source_name(cls)} left as is: " + "; ".join(problems)
        _convert_children(m, name, report, backend)
        return m
    new = _adopt(spec.target, m, backend)
    report.converted[_label(name)] = f"{_source_name(cls)} -> fastres.nn.{spec.target.__name__}"
    for part, why in unfused.items():
        report.unfused[_qual(name, part)] = why
    _convert_children(new, name, report, backend)  # e.g. a torchvision block inside a custom downsample
    return new


def _convert_resnet(m, name, tv_resnet, report, backend):
    from fastres.models.resnet import ResNet

    problems = []
    if type(m).forward is not tv_resnet.forward or type(m)._forward_impl is not tv_resnet._forward_impl:
        problems.append(f"{type(m).__name__} overrides forward")
    if _fusability.has_hooks(m):
        problems.append("the model has hooks")
    missing = [a for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4",
                           "avgpool", "fc") if not isinstance(getattr(m, a, None), nn.Module)]
    if missing:
        problems.append("missing " + ", ".join(missing))
    _convert_children(m, name, report, backend)
    if problems:
        report.unconverted[_label(name)] = (
            f"{_source_name(tv_resnet)} kept (its blocks are converted): " + "; ".join(problems)
        )
        return m
    new = _adopt(ResNet, m, backend)
    new._norm_layer = getattr(m, "_norm_layer", nn.BatchNorm2d)
    new._activation = "relu"
    new._bn_frozen = False
    if type(m.avgpool) is not nn.AdaptiveAvgPool2d or m.avgpool.output_size not in (1, (1, 1)):
        new._pool_type = None  # a custom pooling: reset_classifier keeps it unless told otherwise
    new.num_features = _num_features(m)
    new.num_classes = m.fc.out_features if isinstance(m.fc, nn.Linear) else None
    report.converted[_label(name)] = f"{_source_name(tv_resnet)} -> fastres.models.ResNet"
    why = (_fusability.conv_unfusable_reason(m.conv1) or _fusability.bn_unfusable_reason(m.bn1)
           or _fusability.activation_unfusable_reason(m.relu))
    if why:
        report.unfused[_qual(name, "conv1/bn1/relu")] = why
    return new


def _num_features(m: nn.Module) -> Optional[int]:
    if isinstance(m.fc, nn.Linear):
        return m.fc.in_features
    for block in reversed(list(m.layer4.modules())):
        for bn in ("bn3", "bn2"):
            norm = getattr(block, bn, None)
            if isinstance(norm, nn.modules.batchnorm._BatchNorm):
                return norm.num_features
    return None


def _convert_children(m: nn.Module, prefix: str, report: ConversionReport, backend: Optional[str]) -> None:
    for child_name, child in list(m._modules.items()):
        if child is None:
            continue
        new = _convert(child, _qual(prefix, child_name), report, backend)
        if new is not child:
            m._modules[child_name] = new


def _convert(m: nn.Module, name: str, report: ConversionReport, backend: Optional[str]) -> nn.Module:
    if isinstance(m, FusedModule):
        return m  # already fastres
    tv = sys.modules.get("torchvision.models.resnet")
    if tv is not None and isinstance(m, tv.ResNet):
        return _convert_resnet(m, name, tv.ResNet, report, backend)
    for cls, spec in _sources():
        if isinstance(m, cls):
            return _convert_block(m, name, cls, spec, report, backend)
    _convert_children(m, name, report, backend)
    return m


def convert(model: nn.Module, *, backend: Optional[str] = None, inplace: bool = False, warn: bool = True) -> nn.Module:
    """A fastres version of a torchvision (or timm) ResNet-family ``model``.

    Returns a model with the same state_dict keys and outputs (a
    :class:`fastres.models.ResNet` when ``model`` is a torchvision ``ResNet``;
    otherwise ``model`` with its recognized blocks converted, wherever they are
    nested). ``inplace=False`` deep-copies ``model`` first and never mutates it;
    ``inplace=True`` converts its blocks in place, sharing every parameter.
    ``backend`` is set on the new fastres modules (None = best available).

    The result's ``fastres_conversion`` attribute is a :class:`ConversionReport`;
    modules left unconverted, or a model in which nothing was converted, are
    also reported in a ``UserWarning`` (``warn=False`` silences it).
    """
    check_backend_name("fastres.convert", backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"fastres.convert: expected an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    report = ConversionReport()
    result = _convert(model, "", report, backend)
    result.fastres_conversion = report
    if warn and (report.unconverted or not report.converted):
        warnings.warn(str(report), UserWarning, stacklevel=2)
    return result


class _CallableModule(types.ModuleType):
    """``fastres.convert`` is both this module and its function: ``fastres.convert(model)`` works
    whichever of the two the package attribute holds (importing the submodule binds the module)."""

    def __call__(self, model: nn.Module, **kwargs) -> nn.Module:
        return convert(model, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
