"""Every distinct convolution of a torchvision ResNet-family model, exactly.

``conv_shapes("resnet50", batch=32)`` runs the torchvision model on the
``meta`` device (no weights, no memory, instant) with a forward hook on each
``nn.Conv2d`` and returns one :class:`ConvShape` per distinct convolution,
with how many times it occurs. Shared by the tests and the benchmarks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import torch

from fastres._conv import out_size as conv_out_size


@dataclass(frozen=True)
class ConvShape:
    """One convolution: input (N, C, H, W), weight (K, C/groups, R, S), square
    stride/padding/dilation; ``residual`` when a residual add follows it (the
    last conv of a block); ``name`` of its first occurrence; ``count`` occurrences."""

    N: int
    C: int
    H: int
    W: int
    K: int
    R: int
    S: int
    stride: int
    padding: int
    dilation: int
    groups: int
    residual: bool
    name: str = ""
    count: int = 1

    @property
    def P(self) -> int:  # output height
        return conv_out_size(self.H, self.R, self.stride, self.padding, self.dilation)

    @property
    def Q(self) -> int:  # output width
        return conv_out_size(self.W, self.S, self.stride, self.padding, self.dilation)

    @property
    def flops(self) -> int:
        """Multiply-adds times two of one convolution (BN and activation not counted)."""
        return 2 * self.N * self.K * self.P * self.Q * (self.C // self.groups) * self.R * self.S

    @property
    def label(self) -> str:
        """E.g. ``3x3/s2 64->64 g1 56x56 +res``."""
        extra = (f" d{self.dilation}" if self.dilation > 1 else "") + (" +res" if self.residual else "")
        return (f"{self.R}x{self.S}/s{self.stride} {self.C}->{self.K} g{self.groups} "
                f"{self.H}x{self.W}{extra}")


def _square(v) -> int:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v, v)
    if v[0] != v[1]:
        raise ValueError(f"conv_shapes: non-square conv parameter {v}")
    return int(v[0])


def conv_shapes(arch: str, batch: int, image_size: int = 224, **model_kwargs) -> List[ConvShape]:
    """The distinct convs of torchvision's ``arch`` (e.g. ``resnet50``, ``resnext50_32x4d``,
    ``wide_resnet50_2``) on a ``batch`` of RGB images, in order of first use. ``model_kwargs``
    go to the model, e.g. ``replace_stride_with_dilation=[False, True, True]``."""
    import torchvision
    from torchvision.models.resnet import BasicBlock, Bottleneck

    with torch.device("meta"):
        model = torchvision.models.get_model(arch, weights=None, **model_kwargs).eval()
    residual_convs = set()  # the last conv of each block feeds the residual add
    for module in model.modules():
        if isinstance(module, (BasicBlock, Bottleneck)):
            residual_convs.add(id(module.conv3 if isinstance(module, Bottleneck) else module.conv2))
    found: Dict[tuple, List] = {}  # geometry -> [name, count]

    def hook(name):
        def fn(conv, inputs, output):
            n, c, h, w = inputs[0].shape
            k, _, r, s = conv.weight.shape
            key = (n, c, h, w, k, r, s, _square(conv.stride), _square(conv.padding),
                   _square(conv.dilation), conv.groups, id(conv) in residual_convs)
            found.setdefault(key, [name, 0])[1] += 1
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model(torch.empty(batch, 3, image_size, image_size, device="meta"))
    finally:
        for h in handles:
            h.remove()
    return [ConvShape(*key, name=name, count=count) for key, (name, count) in found.items()]
