"""Fused drop-in modules for ResNets (torchvision names, state_dicts and semantics).

* :class:`ConvBNAct` -- ``act(bn(conv(x)) (+ residual))``;
* :class:`BasicBlock`, :class:`Bottleneck` -- torchvision's residual blocks
  (:class:`TimmBasicBlock`, :class:`TimmBottleneck`: the same with timm's names);
* :func:`set_backend`, :func:`set_training_memory`, :func:`freeze_bn`, :func:`clear_cache` --
  whole-model helpers.

What runs fused in eval and in train mode: ``fastres/nn/_fuse.py`` (the entry point) and docs/models.md.
"""
from fastres.nn._fusability import make_activation
from fastres.nn.modules import (
    BasicBlock,
    Bottleneck,
    ConvBNAct,
    FusedModule,
    TimmBasicBlock,
    TimmBottleneck,
    clear_cache,
    conv1x1,
    conv3x3,
    freeze_bn,
    set_backend,
    set_training_memory,
)

__all__ = [
    "BasicBlock",
    "Bottleneck",
    "ConvBNAct",
    "FusedModule",
    "TimmBasicBlock",
    "TimmBottleneck",
    "clear_cache",
    "conv1x1",
    "conv3x3",
    "freeze_bn",
    "make_activation",
    "set_backend",
    "set_training_memory",
]
