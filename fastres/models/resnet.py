"""ResNet, ResNeXt and Wide ResNet built from fastres's fused blocks.

Drop-in for ``torchvision.models.resnet``: the same constructors and arguments,
module names (``conv1, bn1, relu, maxpool, layer1..4, avgpool, fc``),
parameters, buffers and state_dict keys, and the same outputs (logits
``[N, num_classes]``). Differences: every conv -> BN -> activation runs through
``fastres.ops`` (``fastres/nn/_fuse.py``), the input is made channels_last once
at the start (``ResNet.channels_last``), and timm's conveniences are added:
``forward_features``, ``forward_head``, ``reset_classifier``, ``get_classifier``,
``num_features`` (docs/models.md lists what is timm-compatible), plus
``freeze_bn`` for frozen-statistics fine-tuning.
"""
from __future__ import annotations

from typing import Any, Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn

from fastres._tracing import is_fx_proxy
from fastres.nn._fusability import make_activation
from fastres.nn._pooling import max_pool
from fastres.nn import modules as _m
from fastres.nn.modules import BasicBlock, Bottleneck, FusedModule, conv1x1

__all__ = [
    "ResNet",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "resnext50_32x4d",
    "resnext101_32x8d",
    "resnext101_64x4d",
    "wide_resnet50_2",
    "wide_resnet101_2",
]

_Block = Type[Union[BasicBlock, Bottleneck]]
# reset_classifier's global_pool (timm's names) -> the pooling module at ``avgpool``.
_POOLS = {
    "avg": lambda: nn.AdaptiveAvgPool2d((1, 1)),
    "max": lambda: nn.AdaptiveMaxPool2d((1, 1)),
    "": nn.Identity,
}


class ResNet(FusedModule):
    """torchvision's ``ResNet`` (same arguments), fused.

    Extra keyword-only arguments: ``activation`` (``"relu"``, ``"silu"`` or
    ``"identity"``, for the stem and every block) and ``backend`` (None = the
    best available for the input's device; ``fastres.set_backend`` changes it
    for the whole model later).
    """

    #: Convert the input to channels_last (once, at the start of forward).
    channels_last: bool = True
    #: The pooling at ``avgpool`` by reset_classifier's name; None: a module set by other means.
    _pool_type: Optional[str] = "avg"

    def __init__(
        self,
        block: _Block,
        layers: List[int],
        num_classes: int = 1000,
        zero_init_residual: bool = False,
        groups: int = 1,
        width_per_group: int = 64,
        replace_stride_with_dilation: Optional[List[bool]] = None,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        activation: str = "relu",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(backend)
        if norm_layer is None:
            norm_layer = nn.BatchNorm2d
        self._norm_layer = norm_layer
        self._activation = activation
        self.inplanes = 64
        self.dilation = 1
        if replace_stride_with_dilation is None:
            replace_stride_with_dilation = [False, False, False]
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(
                "replace_stride_with_dilation should be None "
                f"or a 3-element tuple, got {replace_stride_with_dilation}"
            )
        self.groups = groups
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = make_activation(activation, "ResNet")
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2, dilate=replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2, dilate=replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], stride=2, dilate=replace_stride_with_dilation[2])
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.num_features = 512 * block.expansion
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)
        self._bn_frozen = False

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

        # Zero-initialize the last BN in each residual branch (https://arxiv.org/abs/1706.02677).
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, Bottleneck) and m.bn3.weight is not None:
                    nn.init.constant_(m.bn3.weight, 0)
                elif isinstance(m, BasicBlock) and m.bn2.weight is not None:
                    nn.init.constant_(m.bn2.weight, 0)

    def _make_layer(
        self, block: _Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        previous_dilation = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                norm_layer(planes * block.expansion),
            )
        extra = {}
        if isinstance(block, type) and issubclass(block, FusedModule):
            extra = dict(activation=self._activation, backend=self.backend)
        layers = [
            block(self.inplanes, planes, stride, downsample, self.groups, self.base_width, previous_dilation,
                  norm_layer, **extra)
        ]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(
                block(self.inplanes, planes, groups=self.groups, base_width=self.base_width,
                      dilation=self.dilation, norm_layer=norm_layer, **extra)
            )
        return nn.Sequential(*layers)

    # -- forward ------------------------------------------------------------

    def forward_features(self, x: Tensor) -> Tensor:
        """The feature map before pooling, ``[N, num_features, H/32, W/32]`` (channels_last).

        Under FX symbolic tracing: torchvision's ``conv1, bn1, relu, maxpool, layer1..4``
        module by module (the blocks too), so the graph is torchvision's.
        """
        if is_fx_proxy(x):
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        else:
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            # in training the pooling takes the stem's pending BN (it runs ReLU's backward on its
            # output), except with training_memory="min", where the stem keeps no conv output
            defer = getattr(self, "training_memory", "low") != "min"
            x = self._conv_bn("bn1", x, self.conv1, self.bn1, self.relu, defer=defer)
            x = max_pool(self.maxpool, x, self.backend)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pool, flatten and (unless ``pre_logits``) classify a ``forward_features`` output
        (timm's method; after ``reset_classifier(0, "")``: no pooling, no flattening)."""
        x = self.avgpool(x)
        if self._pool_type != "":
            x = torch.flatten(x, 1)
        return x if pre_logits else self.fc(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    # -- transfer learning --------------------------------------------------

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """timm's ``reset_classifier``: a new, freshly initialized ``fc`` for ``num_classes``
        (0: no classifier, ``forward`` returns the pooled features), on the old one's device and dtype.

        ``global_pool``: None keeps the current pooling; ``"avg"`` (torchvision's and
        timm's default) or ``"max"`` pool to ``[N, num_features]``; ``""`` removes the
        pooling (with ``num_classes=0``: ``forward`` returns the feature map). The
        pooling module keeps torchvision's name, ``avgpool``.
        """
        if global_pool is not None and global_pool not in _POOLS:
            raise ValueError(
                f"ResNet.reset_classifier: unsupported global_pool {global_pool!r}; expected None (keep), "
                + ", ".join(repr(p) for p in _POOLS)
            )
        if global_pool is None:
            global_pool = self._pool_type
        if global_pool == "" and num_classes > 0:
            raise ValueError(
                f"ResNet.reset_classifier: global_pool='' (no pooling) needs num_classes=0, got {num_classes}"
            )
        old = self.fc
        ref = next(old.parameters(), None) if isinstance(old, nn.Module) else None
        kw = {} if ref is None else dict(device=ref.device, dtype=ref.dtype)
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes, **kw) if num_classes > 0 else nn.Identity()
        if global_pool is not None and global_pool != self._pool_type:
            self.avgpool = _POOLS[global_pool]()
            self._pool_type = global_pool
        self.avgpool.train(self.training)
        self.fc.train(self.training)

    def freeze_bn(self, freeze: bool = True, *, affine: bool = True) -> "ResNet":
        """Freeze (or unfreeze) the BatchNorm statistics, also across later ``train()`` calls.

        Frozen BNs normalize with their running statistics and never update them,
        and their conv -> BN -> act runs as one fused ``conv_bn_act`` even in
        training; with ``affine=True`` their weight and bias keep training.
        ``affine=False`` also turns their ``requires_grad`` off (not undone by
        ``freeze_bn(False)``).
        """
        self._bn_frozen = freeze
        if freeze:
            _m.freeze_bn(self, affine=affine)
        else:
            self.train(self.training)
        return self

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and getattr(self, "_bn_frozen", False):
            _m.freeze_bn(self)
        return self


# ----------------------------------------------------------------------------
# Constructors, with torchvision's pretrained weights.
# ----------------------------------------------------------------------------


def _weights(arch: str, weights: Any):
    """torchvision's weights enum member for ``arch`` (accepts the enum or its name)."""
    try:
        from torchvision.models import get_model_weights
    except ImportError as e:  # pragma: no cover - torchvision is a test dependency
        raise ImportError(
            f"fastres.models.{arch}(weights=...) loads torchvision's pretrained weights; "
            "install torchvision"
        ) from e
    return get_model_weights(arch).verify(weights)


def _resnet(arch: str, block: _Block, layers: List[int], weights: Any, progress: bool, **kwargs: Any) -> ResNet:
    if weights is not None:
        weights = _weights(arch, weights)
        n = len(weights.meta["categories"])
        if kwargs.setdefault("num_classes", n) != n:
            raise ValueError(f"The parameter 'num_classes' expected value {n} but got {kwargs['num_classes']} instead.")
    model = ResNet(block, layers, **kwargs)
    if weights is not None:
        model.load_state_dict(weights.get_state_dict(progress=progress, check_hash=True))
    return model


def _doc(tv_name: str, what: str) -> str:
    return (
        f"{what}, fused; ``torchvision.models.{tv_name}``'s arguments and module names.\n\n"
        "    ``weights``: a ``torchvision.models`` weights enum member (or its name, e.g.\n"
        "    ``\"DEFAULT\"``) whose state_dict is downloaded by torchvision and loaded;\n"
        "    ``progress``: show the download's progress. Other keyword arguments go to\n"
        "    :class:`ResNet` (``num_classes``, ``zero_init_residual``, ``groups``,\n"
        "    ``width_per_group``, ``replace_stride_with_dilation``, ``norm_layer``,\n"
        "    ``activation``, ``backend``).\n    "
    )


def resnet18(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet18", BasicBlock, [2, 2, 2, 2], weights, progress, **kwargs)


def resnet34(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet34", BasicBlock, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet50(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet50", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnet101(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet101", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnet152(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    return _resnet("resnet152", Bottleneck, [3, 8, 36, 3], weights, progress, **kwargs)


def _set(kwargs: dict, name: str, value: int) -> None:
    if kwargs.setdefault(name, value) != value:
        raise ValueError(f"The parameter '{name}' expected value {value} but got {kwargs[name]} instead.")


def resnext50_32x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _set(kwargs, "groups", 32)
    _set(kwargs, "width_per_group", 4)
    return _resnet("resnext50_32x4d", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def resnext101_32x8d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _set(kwargs, "groups", 32)
    _set(kwargs, "width_per_group", 8)
    return _resnet("resnext101_32x8d", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def resnext101_64x4d(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _set(kwargs, "groups", 64)
    _set(kwargs, "width_per_group", 4)
    return _resnet("resnext101_64x4d", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


def wide_resnet50_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _set(kwargs, "width_per_group", 64 * 2)
    return _resnet("wide_resnet50_2", Bottleneck, [3, 4, 6, 3], weights, progress, **kwargs)


def wide_resnet101_2(*, weights: Any = None, progress: bool = True, **kwargs: Any) -> ResNet:
    _set(kwargs, "width_per_group", 64 * 2)
    return _resnet("wide_resnet101_2", Bottleneck, [3, 4, 23, 3], weights, progress, **kwargs)


for _fn, _what in [
    (resnet18, "ResNet-18"), (resnet34, "ResNet-34"), (resnet50, "ResNet-50"), (resnet101, "ResNet-101"),
    (resnet152, "ResNet-152"), (resnext50_32x4d, "ResNeXt-50 32x4d"), (resnext101_32x8d, "ResNeXt-101 32x8d"),
    (resnext101_64x4d, "ResNeXt-101 64x4d"), (wide_resnet50_2, "Wide ResNet-50-2"),
    (wide_resnet101_2, "Wide ResNet-101-2"),
]:
    _fn.__doc__ = _doc(_fn.__name__, _what)
del _fn, _what
