"""Drop-in fused modules: ``ConvBNAct``, ``BasicBlock``, ``Bottleneck``.

Their submodules are torchvision's (``conv1, bn1, relu, conv2, bn2(, conv3,
bn3), downsample = Sequential(conv, bn)``: plain ``nn.Conv2d`` and
``nn.BatchNorm2d``), so parameters, buffers and state_dict keys are exactly
torchvision's. Only ``forward`` differs: it runs each conv -> BN -> activation
through ``fastres.ops`` (see ``fastres/nn/_fuse.py`` for what runs fused when).

The activation is whatever module sits at ``relu`` (torchvision's name; timm's
blocks use ``act1``, ``act2``...): ``nn.ReLU``, ``nn.SiLU`` and ``nn.Identity``
are fused into the kernels' epilogue, any other module is applied after them.

Under FX symbolic tracing (``torch.fx.symbolic_trace``, torchvision's
``create_feature_extractor``) each block runs ``_forward_modules``: the forward
of the block it replaces (torchvision's or timm's), module by module, so the
traced graph, its node names and its outputs are that library's.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres.backends import check_backend_name
from fastres._tracing import is_fx_proxy
from fastres.nn import _fuse
from fastres.nn._fusability import activation_name, has_hooks, make_activation
from fastres.nn._prepared import PreparedCache


TRAINING_MEMORY = ("low", "min")


class FusedModule(nn.Module):
    """Base of every fastres module: a ``backend``, a ``training_memory`` mode and the
    prepared forms of its convs (``PreparedCache``).

    ``backend`` (None = the best available for the input's device, else
    ``"torch"``, ``"triton"`` or ``"cuda"``) is passed to every ``fastres.ops``
    call; ``fastres.set_backend(model, name)`` sets it on a whole model.

    ``training_memory`` (``fastres.set_training_memory(model, mode)``): what a
    block keeps for backward when its BNs use batch statistics, with the same
    gradients either way (``fastres/nn/_fuse.py``, docs/models.md):

    * ``"low"`` (default): each conv -> BN -> act unit keeps its conv output
      and recomputes its activation in the fused ``bn_act`` backward, for the
      next conv's weight gradient;
    * ``"min"``: the block's last unit (the one with the residual) also keeps
      nothing but per-channel vectors: its conv is recomputed in the backward
      from its input (one more convolution per block).
    """

    def __init__(self, backend: Optional[str] = None) -> None:
        super().__init__()
        check_backend_name(type(self).__name__, backend)
        self.backend = backend
        self.training_memory = "low"
        self._fastres_cache = PreparedCache()

    def _conv_bn(
        self, slot: str, x, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module],
        residual: Optional[Tensor] = None, defer: bool = False,
    ):
        """``act(bn(conv(x)) (+ residual))``; ``defer=True`` (an output that only feeds the
        next ``_conv_bn``) lets a training unit return a ``PendingBN``."""
        return _fuse.conv_bn_act(
            self._fastres_cache, slot, x, conv, bn, act, residual, self.backend, defer,
            getattr(self, "training_memory", "low"),
        )

    def _shortcut(self, x: Tensor, downsample: Optional[nn.Module]) -> Tensor:
        """``downsample(x)``, fused when it is torchvision's ``Sequential(conv, bn)``."""
        if downsample is None:
            return x
        if (
            type(downsample) is nn.Sequential
            and len(downsample) == 2
            and not has_hooks(downsample)
        ):
            return self._conv_bn("downsample", x, downsample[0], downsample[1], None)
        return downsample(x)

    # The cache is dropped whenever it could be outdated without a version bump.
    def train(self, mode: bool = True):
        self._fastres_cache.clear()
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._fastres_cache.clear()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # in-place copies: unversioned on inference tensors
        self._fastres_cache.clear()
        return super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):  # pickle, deepcopy: never carry cached tensors along
        state = self.__dict__.copy()
        state["_fastres_cache"] = PreparedCache()
        return state

    def extra_repr(self) -> str:
        parts = [] if self.backend is None else [f"backend={self.backend!r}"]
        if getattr(self, "training_memory", "low") != "low":
            parts.append(f"training_memory={self.training_memory!r}")
        return ", ".join(parts)


def _norm(norm_layer: Optional[Callable[..., nn.Module]]) -> Callable[..., nn.Module]:
    return nn.BatchNorm2d if norm_layer is None else norm_layer


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, groups: int = 1, dilation: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding (torchvision's)."""
    return nn.Conv2d(
        in_planes, out_planes, kernel_size=3, stride=stride, padding=dilation, groups=groups, bias=False,
        dilation=dilation,
    )


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution (torchvision's)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class ConvBNAct(FusedModule):
    """``act(bn(conv(x)) (+ residual))`` as one fused op; submodules ``conv``, ``bn``, ``act``.

    ``padding=None`` means "same" for odd kernels (``dilation * (k - 1) // 2``).
    ``activation`` is ``"relu"``, ``"silu"`` or ``"identity"``; ``norm_layer``
    (default ``nn.BatchNorm2d``) is called with the number of output channels.
    Extra keyword arguments go to ``nn.Conv2d``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: Optional[int] = None,
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
        *,
        activation: str = "relu",
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        backend: Optional[str] = None,
        **conv_kwargs,
    ) -> None:
        super().__init__(backend)
        if padding is None:
            padding = dilation * (kernel_size - 1) // 2
        self.conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=groups, bias=bias, **conv_kwargs,
        )
        self.bn = _norm(norm_layer)(out_channels)
        self.act = make_activation(activation, "ConvBNAct")

    @classmethod
    def from_modules(
        cls, conv: nn.Module, bn: nn.Module, act: Optional[nn.Module] = None, *, backend: Optional[str] = None
    ) -> "ConvBNAct":
        """Wrap existing modules (shared, not copied); ``act=None`` means no activation."""
        self = cls.__new__(cls)
        FusedModule.__init__(self, backend)
        self.conv, self.bn, self.act = conv, bn, nn.Identity() if act is None else act
        return self

    @property
    def activation(self) -> Optional[str]:
        """The fused activation's name, or None when ``act`` runs as a module after the op."""
        return activation_name(self.act)

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        if is_fx_proxy(x):
            out = self.bn(self.conv(x))
            return self.act(out if residual is None else out + residual)
        return self._conv_bn("bn", x, self.conv, self.bn, self.act, residual)


class BasicBlock(FusedModule):
    """torchvision's ``BasicBlock`` (same arguments and submodules), fused.

    Eval: ``conv1/bn1/relu`` is one ``conv_bn_act``, the downsample
    ``conv/bn`` another (``"identity"``), and ``conv2/bn2/+identity/relu`` a
    third with the residual in its epilogue. Train: batch statistics, then
    ``bn_act`` with the residual (see ``fastres/nn/_fuse.py``).
    """

    expansion: int = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        activation: str = "relu",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(backend)
        norm_layer = _norm(norm_layer)
        if groups != 1 or base_width != 64:
            raise ValueError("BasicBlock only supports groups=1 and base_width=64")
        if dilation > 1:
            raise NotImplementedError("Dilation > 1 not supported in BasicBlock")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = make_activation(activation, "BasicBlock")
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def _acts(self) -> Tuple[nn.Module, nn.Module]:
        """The activation after bn1, and after the residual add."""
        return self.relu, self.relu

    def forward(self, x: Tensor) -> Tensor:
        if is_fx_proxy(x):
            return self._forward_modules(x)
        act1, act2 = self._acts()
        out = self._conv_bn("bn1", x, self.conv1, self.bn1, act1, defer=True)
        identity = self._shortcut(x, self.downsample)
        return self._conv_bn("bn2", out, self.conv2, self.bn2, act2, residual=identity)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's ``BasicBlock.forward``, module by module."""
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class Bottleneck(FusedModule):
    """torchvision's ``Bottleneck`` (ResNet v1.5: stride on the 3x3; same arguments
    and submodules), fused like :class:`BasicBlock`: ``conv1/bn1/relu``,
    ``conv2/bn2/relu``, the downsample, and ``conv3/bn3/+identity/relu``."""

    expansion: int = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        groups: int = 1,
        base_width: int = 64,
        dilation: int = 1,
        norm_layer: Optional[Callable[..., nn.Module]] = None,
        *,
        activation: str = "relu",
        backend: Optional[str] = None,
    ) -> None:
        super().__init__(backend)
        norm_layer = _norm(norm_layer)
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = norm_layer(width)
        self.conv2 = conv3x3(width, width, stride, groups, dilation)
        self.bn2 = norm_layer(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = make_activation(activation, "Bottleneck")
        self.downsample = downsample
        self.stride = stride

    def _acts(self) -> Tuple[nn.Module, nn.Module, nn.Module]:
        """The activations after bn1, after bn2, and after the residual add."""
        return self.relu, self.relu, self.relu

    def forward(self, x: Tensor) -> Tensor:
        if is_fx_proxy(x):
            return self._forward_modules(x)
        act1, act2, act3 = self._acts()
        out = self._conv_bn("bn1", x, self.conv1, self.bn1, act1, defer=True)
        out = self._conv_bn("bn2", out, self.conv2, self.bn2, act2, defer=True)
        identity = self._shortcut(x, self.downsample)
        return self._conv_bn("bn3", out, self.conv3, self.bn3, act3, residual=identity)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """torchvision's ``Bottleneck.forward``, module by module."""
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv3(out)
        out = self.bn3(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


# ----------------------------------------------------------------------------
# Whole-model helpers.
# ----------------------------------------------------------------------------


def fused_modules(model: nn.Module) -> Iterator[FusedModule]:
    return (m for m in model.modules() if isinstance(m, FusedModule))


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Run every fastres module of ``model`` on ``backend`` (None = best available); returns ``model``.

    Only the name is validated here (``"torch"``, ``"triton"``, ``"cuda"`` or
    None); whether the backend can run on the model's device is checked, with
    the reason, at the first forward.
    """
    check_backend_name("fastres.set_backend", backend)
    for m in fused_modules(model):
        m.backend = backend
    return model


def set_training_memory(model: nn.Module, mode: str) -> nn.Module:
    """Set what every fastres module of ``model`` keeps for backward in training; returns ``model``.

    ``"low"`` (the default) or ``"min"`` (:class:`FusedModule`); the gradients
    and running statistics are the same in both.
    """
    if mode not in TRAINING_MEMORY:
        raise ValueError(
            f"fastres.set_training_memory: expected `mode` to be one of {', '.join(map(repr, TRAINING_MEMORY))}, "
            f"got {mode!r}"
        )
    for m in fused_modules(model):
        m.training_memory = mode
    return model


def clear_cache(model: nn.Module) -> nn.Module:
    """Drop everything ``model``'s fastres modules prepared from their parameters (eval-mode BN
    scale/shift, folded and prepacked weights; only needed after editing parameters or buffers
    through ``.data``, or editing inference tensors in place inside ``inference_mode``: PyTorch
    versions neither); returns ``model``."""
    for m in fused_modules(model):
        m._fastres_cache.clear()
    return model


def freeze_bn(model: nn.Module, *, affine: bool = True) -> nn.Module:
    """Put every BatchNorm of ``model`` in eval mode: running statistics are used
    and no longer updated (frozen-statistics fine-tuning); returns ``model``.

    With ``affine=True`` the BN ``weight``/``bias`` stay trainable (the fused
    eval path is differentiable with respect to them); ``affine=False`` also
    sets their ``requires_grad`` to False. ``model.train()`` puts BNs back in
    training mode, except on a :class:`fastres.models.ResNet`, whose
    ``freeze_bn()`` method makes the freeze survive ``train()``.
    """
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.eval()
            if not affine:
                for p in (m.weight, m.bias):
                    if p is not None:
                        p.requires_grad_(False)
    for m in fused_modules(model):
        m._fastres_cache.clear()
    return model


# ----------------------------------------------------------------------------
# timm's block layout (``fastres.convert`` of timm ResNets).
# ----------------------------------------------------------------------------

# timm's optional block submodules: absent or nn.Identity for the fused path.
TIMM_OPTIONAL = ("drop_block", "aa", "se", "drop_path")


def _present(m: Optional[nn.Module]) -> bool:
    return m is not None and type(m) is not nn.Identity


class TimmBasicBlock(BasicBlock):
    """:class:`BasicBlock` with timm's submodule names: ``act1``, ``act2`` instead of
    ``relu`` (plus timm's optional ``drop_block``, ``aa``, ``se``, ``drop_path``,
    absent or ``nn.Identity`` for the fused path; present, the block runs timm's
    forward unfused, as under FX tracing). Same arguments as :class:`BasicBlock`."""

    def __init__(self, *args, activation: str = "relu", backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, activation=activation, backend=backend, **kwargs)
        del self.relu
        self.act1 = make_activation(activation, type(self).__name__)
        self.act2 = make_activation(activation, type(self).__name__)

    def _acts(self):
        return self.act1, self.act2

    def forward(self, x: Tensor) -> Tensor:
        if any(_present(getattr(self, n, None)) for n in TIMM_OPTIONAL):
            return self._forward_modules(x)
        return super().forward(x)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """timm's ``BasicBlock.forward``, module by module."""
        shortcut = x
        x = self.bn1(self.conv1(x))
        x = _call(self, "drop_block", x)
        x = _call(self, "aa", self.act1(x))
        x = self.bn2(self.conv2(x))
        x = _call(self, "drop_path", _call(self, "se", x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act2(x + shortcut)


class TimmBottleneck(Bottleneck):
    """:class:`Bottleneck` with timm's submodule names (``act1``, ``act2``, ``act3``;
    see :class:`TimmBasicBlock`)."""

    def __init__(self, *args, activation: str = "relu", backend: Optional[str] = None, **kwargs) -> None:
        super().__init__(*args, activation=activation, backend=backend, **kwargs)
        del self.relu
        self.act1 = make_activation(activation, type(self).__name__)
        self.act2 = make_activation(activation, type(self).__name__)
        self.act3 = make_activation(activation, type(self).__name__)

    def _acts(self):
        return self.act1, self.act2, self.act3

    def forward(self, x: Tensor) -> Tensor:
        if any(_present(getattr(self, n, None)) for n in TIMM_OPTIONAL):
            return self._forward_modules(x)
        return super().forward(x)

    def _forward_modules(self, x: Tensor) -> Tensor:
        """timm's ``Bottleneck.forward``, module by module."""
        shortcut = x
        x = self.act1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        x = _call(self, "drop_block", x)
        x = _call(self, "aa", self.act2(x))
        x = self.bn3(self.conv3(x))
        x = _call(self, "drop_path", _call(self, "se", x))
        if self.downsample is not None:
            shortcut = self.downsample(shortcut)
        return self.act3(x + shortcut)


def _call(owner: nn.Module, name: str, x: Tensor) -> Tensor:
    m = getattr(owner, name, None)
    return x if m is None else m(x)
