"""Kernel benchmark cases, shared by ``python -m benchmarks`` and pytest-benchmark.

A :class:`KernelCase` is one fused op on one shape of a real network: every
distinct convolution of a torchvision ResNet (``fastres.shapes.conv_shapes``,
the table the tests use too) gives one ``conv_bn_act`` case, and its output
shape gives the elementwise cases (``bn_act`` after it, with the residual where
a residual add follows; ``add_act`` there too). :func:`kernel_cases` lists them;
:func:`providers` builds, for one case, every way of computing it:

==================  ==========================================================
provider            what runs
==================  ==========================================================
``eager``           the stock PyTorch sequence fastres replaces: ``relu(x + r)``;
                    ``act(bn(x) (+ r))``; ``act(bn(conv(x)) (+ r))``, with an
                    ``nn.Conv2d`` in the input dtype and an eval
                    ``nn.BatchNorm2d`` holding fp32 parameters (as in AMP models)
``compile``         ``torch.compile`` of that same function
``cudnn-fused``     (GPU, conv) cuDNN's fused ``torch.cudnn_convolution_relu`` /
                    ``torch.cudnn_convolution_add_relu`` with the BN folded into
                    weight and bias in fp32, then cast once (the downsample convs,
                    without activation: ``F.conv2d`` with the folded bias)
``folded``          (CPU, conv) the same folding, then ``F.conv2d`` and
                    ``relu(y (+ r))``: what ``torch.fx`` BN folding gives
``fastres-<b>``     ``fastres.ops.<op>(..., backend=b)`` for every backend usable
                    here that implements the op
``fastres-auto``    (GPU, conv) ``backend=None``: the per-shape choice of
                    ``fastres.tune``, measured on the first call
==================  ==========================================================

Everything is channels_last. The activation is ReLU, except after a
downsample conv (``identity``), as in the networks.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from fastres.shapes import ConvShape, conv_shapes

OPS = ("add_act", "bn_act", "conv_bn_act")
SUITE_OPS = {"ops": ("add_act", "bn_act"), "conv": ("conv_bn_act",)}
STOCK_PROVIDERS = ("eager", "compile", "cudnn-fused", "folded")


@dataclass(frozen=True)
class KernelCase:
    """One op on one shape. ``shape``: the (N, C, H, W) input of the op (for
    ``conv_bn_act``, of the convolution); ``conv``: the convolution
    (``ConvShape`` with ``name``/``count`` cleared, so equal geometries compare
    equal); ``source``: where it first occurs, e.g. ``resnet50 layer1.0.conv2 (x3)``."""

    op: str
    shape: Tuple[int, int, int, int]
    residual: bool
    activation: str
    conv: Optional[ConvShape] = None
    source: str = field(default="", compare=False)

    @property
    def suite(self) -> str:
        return "conv" if self.op == "conv_bn_act" else "ops"

    @property
    def batch(self) -> int:
        return self.shape[0]

    @property
    def out_shape(self) -> Tuple[int, int, int, int]:
        if self.conv is None:
            return self.shape
        return (self.conv.N, self.conv.K, self.conv.P, self.conv.Q)

    @property
    def label(self) -> str:
        """Short, unique within a batch size: ``bn_act+res 256x56x56`` or ``conv 3x3/s1 64->64 56x56 +res``."""
        if self.conv is not None:
            c = self.conv
            return (f"conv {c.R}x{c.S}/s{c.stride} {c.C}->{c.K} {c.H}x{c.W}"
                    + (f" g{c.groups}" if c.groups > 1 else "") + (f" d{c.dilation}" if c.dilation > 1 else "")
                    + (" +res" if self.residual else "") + ("" if self.activation == "relu" else " no-act"))
        n, c, h, w = self.shape
        op = self.op + ("+res" if self.residual and self.op == "bn_act" else "")
        return f"{op} {c}x{h}x{w}" + ("" if self.activation == "relu" else f" {self.activation}")

    @property
    def id(self) -> str:
        """pytest id: ``N64-conv-3x3s1-64to64-56x56-res``."""
        text = f"N{self.batch}-" + self.label.replace(" ", "-").replace("/", "").replace("->", "to")
        return text.replace("+", "")

    @property
    def flops(self) -> int:
        """Convolution multiply-adds x 2 (the epilogue is not counted); 0 for elementwise ops."""
        return self.conv.flops if self.conv is not None else 0

    def min_bytes(self, dtype: torch.dtype) -> int:
        """The least traffic any implementation needs: each input read once, the output written once."""
        size = torch.empty((), dtype=dtype).element_size()
        out = _numel(self.out_shape)
        if self.op == "add_act":
            return 3 * out * size
        if self.op == "bn_act":
            return (3 if self.residual else 2) * out * size
        c = self.conv
        weight = c.K * (c.C // c.groups) * c.R * c.S
        return (_numel(self.shape) + weight + out * (2 if self.residual else 1)) * size


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _activation(conv: ConvShape) -> str:
    """ResNet's downsample convs feed the residual through BN alone; every other conv ends in a ReLU."""
    return "identity" if "downsample" in conv.name else "relu"


def conv_case(s: ConvShape, source: str = "") -> KernelCase:
    """The ``conv_bn_act`` case of one convolution of a network."""
    geometry = ConvShape(s.N, s.C, s.H, s.W, s.K, s.R, s.S, s.stride, s.padding, s.dilation, s.groups, s.residual)
    return KernelCase("conv_bn_act", (s.N, s.C, s.H, s.W), s.residual, _activation(s), geometry, source)


def cases_of(arch: str, batch: int, image_size: int = 224) -> List[KernelCase]:
    """Every distinct kernel case of ``arch`` at ``batch``, in order of first use:
    the conv, then bn_act on its output, then add_act where a residual add follows."""
    out: Dict[KernelCase, None] = {}
    for s in conv_shapes(arch, batch, image_size):
        src = f"{arch} {s.name}" + (f" (x{s.count})" if s.count > 1 else "")
        conv = conv_case(s, src)
        oshape = (s.N, s.K, s.P, s.Q)
        found = [conv, KernelCase("bn_act", oshape, s.residual, conv.activation, None, src)]
        if s.residual:
            found.append(KernelCase("add_act", oshape, True, conv.activation, None, src))
        for case in found:
            out.setdefault(case, None)
    return list(out)


def _quick(cases: List[KernelCase], op: str, device_type: str) -> List[KernelCase]:
    """The quick subset of one arch's cases of ``op`` (module docstring of ``benchmarks.__main__``)."""
    mine = [c for c in cases if c.op == op]
    if op == "conv_bn_act":
        if device_type == "cuda":  # the 8 convs repeated most often (stable: first use breaks ties)
            counts = {c: _count(c) for c in mine}
            return sorted(sorted(mine, key=lambda c: -counts[c])[:8], key=mine.index)
        first_3x3 = next((c for c in mine if c.conv.R == 3), None)
        first_res = next((c for c in mine if c.residual), None)
        return list(dict.fromkeys(c for c in (first_3x3, first_res) if c is not None))
    if device_type == "cuda":  # the largest and the smallest spatial size of each variant
        picked = []
        for residual in (False, True):
            group = [c for c in mine if c.residual == residual and c.activation == "relu"]
            if group:
                picked += [max(group, key=lambda c: c.shape[2]), min(group, key=lambda c: c.shape[2])]
        return list(dict.fromkeys(picked))
    group = [c for c in mine if c.residual]  # CPU: the largest residual shape
    return [max(group, key=lambda c: c.shape[2])] if group else mine[:1]


def _count(case: KernelCase) -> int:
    tail = case.source.rsplit("(x", 1)
    return int(tail[1].rstrip(")")) if len(tail) == 2 else 1


def kernel_cases(suite: str, archs: Sequence[str], batches: Sequence[int], *, quick: bool,
                 device_type: str, image_size: int = 224) -> List[KernelCase]:
    """The cases of ``suite`` (``"ops"``: add_act and bn_act; ``"conv"``: conv_bn_act).

    Full: every distinct shape of every arch at every batch. Quick: only the
    first arch, and of it (GPU) the largest and smallest spatial size of each
    elementwise variant and the 8 most repeated convs, or (CPU) the largest
    residual shape of each elementwise op and two convs (the first 3x3, the
    first one followed by a residual add).
    """
    ops = SUITE_OPS[suite]
    out: Dict[KernelCase, None] = {}
    for batch in batches:
        for arch in (archs[:1] if quick else archs):
            cases = cases_of(arch, batch, image_size)
            for op in ops:
                for c in (_quick(cases, op, device_type) if quick else [c for c in cases if c.op == op]):
                    out.setdefault(c, None)
    return list(out)


# ----------------------------------------------------------------------------
# Providers.
# ----------------------------------------------------------------------------


def kernel_backends(op: str, device: torch.device) -> List[str]:
    """fastres backends worth timing for ``op`` here, best first (never the Triton interpreter)."""
    from fastres import backends, ops

    if device.type != "cuda":
        return ["torch"]
    return backends.usable_backends(device, backends.implemented_backends(op))


def _act(y: torch.Tensor, activation: str) -> torch.Tensor:
    return torch.relu(y) if activation == "relu" else y


def _bn(channels: int, device, gen: torch.Generator) -> torch.nn.BatchNorm2d:
    bn = torch.nn.BatchNorm2d(channels).eval()  # fp32 parameters, as in AMP models
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.normal_(0, 0.5, generator=gen)
        bn.running_mean.normal_(0, 0.5, generator=gen)
        bn.running_var.uniform_(0.5, 2.0, generator=gen)
    return bn.to(device)


def _conv_modules(c: ConvShape, device, dtype, gen: torch.Generator):
    """A bias-free ``nn.Conv2d`` (He-initialized, channels_last, ``dtype``) and its eval BN, with (scale, shift)."""
    from fastres import ops

    conv = torch.nn.Conv2d(c.C, c.K, (c.R, c.S), c.stride, c.padding, c.dilation, c.groups, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * (2.0 / (c.C // c.groups * c.R * c.S)) ** 0.5)
    conv = conv.to(device=device, dtype=dtype, memory_format=torch.channels_last).eval()
    bn = _bn(c.K, device, gen)
    scale, shift = (t.detach() for t in ops.bn_scale_shift(bn))
    return conv, bn, scale, shift


def conv_inputs(case: KernelCase, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """``(x, weight, scale, shift, residual or None)`` of a ``conv_bn_act`` case, channels_last."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.shape, generator=gen).to(device=device, dtype=dtype)
    r = torch.randn(case.out_shape, generator=gen).to(device=device, dtype=dtype) if case.residual else None
    conv, _, scale, shift = _conv_modules(case.conv, device, dtype, gen)
    cl = torch.channels_last
    return x.contiguous(memory_format=cl), conv.weight.detach(), scale, shift, None if r is None else r.contiguous(memory_format=cl)


def providers(case: KernelCase, device: torch.device, dtype: torch.dtype, *, compile: bool = True,
              seed: int = 0) -> Dict[str, Tuple[Callable[[], torch.Tensor], Optional[str]]]:
    """``{provider: (fn, fastres backend or None)}`` for ``case``; each ``fn()`` returns the output.

    Inputs are channels_last, drawn from a seeded generator; ``compile=False``
    leaves out the ``compile`` provider.
    """
    from fastres import ops

    gen = torch.Generator().manual_seed(seed)
    cl = torch.channels_last

    def tensor(shape):
        return torch.randn(shape, generator=gen).to(device=device, dtype=dtype).contiguous(memory_format=cl)

    x = tensor(case.shape)
    r = tensor(case.out_shape) if case.residual else None
    act = case.activation
    out: Dict[str, Tuple[Callable[[], torch.Tensor], Optional[str]]] = {}
    if case.op == "add_act":
        def eager():
            return _act(x + r, act)

        fused = {b: (lambda b=b: ops.add_act(x, r, act, backend=b)) for b in kernel_backends(case.op, device)}
    elif case.op == "bn_act":
        bn = _bn(case.shape[1], device, gen)
        scale, shift = (t.detach() for t in ops.bn_scale_shift(bn))

        def eager():
            y = bn(x)
            return _act(y + r if r is not None else y, act)

        fused = {b: (lambda b=b: ops.bn_act(x, scale, shift, r, act, backend=b))
                 for b in kernel_backends(case.op, device)}
    else:
        c = case.conv
        conv, bn, scale, shift = _conv_modules(c, device, dtype, gen)
        geometry = dict(stride=c.stride, padding=c.padding, dilation=c.dilation, groups=c.groups)

        def eager():
            y = bn(conv(x))
            return _act(y + r if r is not None else y, act)

        # BN folded in fp32, then cast once: w' = w * scale[k], b' = shift.
        w_f = (conv.weight.float() * scale.view(-1, 1, 1, 1)).to(dtype).contiguous(memory_format=cl)
        b_f = shift.to(dtype)
        args = ([c.stride] * 2, [c.padding] * 2, [c.dilation] * 2, c.groups)
        if device.type == "cuda":
            if act == "identity":
                out_fused = lambda: F.conv2d(x, w_f, b_f, *args)  # noqa: E731
            elif r is None:
                out_fused = lambda: torch.cudnn_convolution_relu(x, w_f, b_f, *args)  # noqa: E731
            else:
                out_fused = lambda: torch.cudnn_convolution_add_relu(x, w_f, r, 1.0, b_f, *args)  # noqa: E731
            stock_fused = ("cudnn-fused", out_fused)
        else:
            def folded():
                y = F.conv2d(x, w_f, b_f, *args)
                return _act(y + r if r is not None else y, act)

            stock_fused = ("folded", folded)
        fused = {b: (lambda b=b: ops.conv_bn_act(x, conv.weight, scale, shift, r, activation=act, backend=b,
                                                 **geometry))
                 for b in kernel_backends(case.op, device)}
        if device.type == "cuda":
            fused["auto"] = lambda: ops.conv_bn_act(x, conv.weight, scale, shift, r, activation=act, **geometry)
    out["eager"] = (eager, None)
    if compile:
        out["compile"] = (torch.compile(eager, dynamic=False), None)
    if case.op == "conv_bn_act":
        out[stock_fused[0]] = (stock_fused[1], None)
    for b, fn in fused.items():
        out[f"fastres-{b}"] = (fn, b)  # "auto": the bench reports the backend fastres.tune chose
    return out


def provider_names(case: KernelCase, device: torch.device, *, compile: bool = True) -> List[str]:
    """The provider names :func:`providers` gives for ``case``, without building inputs."""
    names = ["eager"] + (["compile"] if compile else [])
    if case.op == "conv_bn_act":
        names.append("cudnn-fused" if device.type == "cuda" else "folded")
    auto = ["fastres-auto"] if case.op == "conv_bn_act" and device.type == "cuda" else []
    return names + [f"fastres-{b}" for b in kernel_backends(case.op, device)] + auto


def iter_case_providers(cases: Iterable[KernelCase], device: torch.device, *, compile: bool = True):
    """(case, provider) pairs in benchmark order: what pytest-benchmark parametrizes over."""
    for case in cases:
        for name in provider_names(case, device, compile=compile):
            yield case, name
