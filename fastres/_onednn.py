"""CPU inference path of the ``"torch"`` backend's ``conv_bn_act``: oneDNN's fused convolution.

PyTorch exposes oneDNN's convolution with post-ops as
``torch.ops.mkldnn._convolution_pointwise`` (the op TorchInductor's CPU
freezing emits, with a weight prepacked by
``torch.ops.mkldnn._reorder_convolution_weight``). Here the BN scale is folded
into the weight in fp32 and rounded once to the compute dtype, and the shift is
the bias, so one oneDNN call computes

    act(conv2d(x, weight * scale[k]) + shift[k] (+ residual))

which equals the reference's ``act(conv2d(x, weight) * scale[k] + shift[k] (+ residual))``
up to the rounding of the folded weight (once, to the compute dtype) and of the
output (once, from oneDNN's fp32 accumulator with the post-ops applied to it).

:func:`prepare` makes that weight (for channels_last outputs prepacked into
oneDNN's blocked layout, per input size: :class:`Prepared`); ``fastres.nn`` modules cache it per conv
(``fastres/nn/_prepared.py``), the functional ``fastres.ops.conv_bn_act``
prepares per call. :func:`run` is the call. The ``"torch"`` backend registers
this path with its conditions (``fastres/_backends/torch_backend.py``).

Compute dtype: fp32 for fp32; bf16 and fp16 natively where oneDNN supports
them on this CPU (``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` /
``_fp16_``), else in fp32 on the upcast input (the output rounded once to
``x.dtype``). Used only when no gradient is needed (these ops have no
autograd formula), not for silu after a residual add (oneDNN's PyTorch binding
has no such post-op) or for fp64: those take the reference. Never under
tracing (``fastres._tracing``) nor for tensor subclasses (fake,
functional...): these ops have no fake kernel and no TorchScript or ONNX form,
so a traced graph holds the reference's plain ``convolution``/``mul``/``add``/
``relu`` instead.

The residual ("binary" add post-op) is fused when the output has more than
one pixel and is fp32, or channels_last with ``groups == 1``. Otherwise the
conv runs with its bias only and ``act(y + residual)`` follows in fp32: in
bf16/fp16, PyTorch's binding falls back for NCHW or grouped convs to an aten
``add_relu`` that has no bf16 kernel, and on torch 2.11 a 1x1 output (ResNet
layer4 at 32x32 input) fails with "could not create a memory". In bf16/fp16
that fallback rounds the conv output before the add (two roundings).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from fastres import _conv, _layout, reference
from fastres._tracing import is_tracing

_POST_OP = {"relu": "relu", "silu": "swish", "identity": "none"}
# After the residual add ("binary" post-op) oneDNN's PyTorch binding takes only relu or nothing.
_POST_BINARY_OP = {"relu": "relu", "identity": None}
_AVAILABLE = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _native(dtype: torch.dtype) -> bool:
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    if dtype == torch.float16:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    return dtype == torch.float32


_COMPUTE = (
    {dt: (dt if _native(dt) else torch.float32) for dt in (torch.float32, torch.bfloat16, torch.float16)}
    if _AVAILABLE else {}
)


def compute_dtype(dtype: torch.dtype) -> Optional[torch.dtype]:
    """The dtype oneDNN computes ``conv_bn_act`` in for inputs of ``dtype``; None: not this path."""
    return _COMPUTE.get(dtype)


def unsupported_reason(x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
                       act: str) -> Optional[str]:
    """Why this path does not compute ``conv_bn_act`` for these inputs, or None."""
    if type(x) is not Tensor or x.device.type != "cpu" or x.dtype not in _COMPUTE:
        return "oneDNN's fused conv takes plain CPU tensors of fp32, bf16 or fp16"
    if x.shape[0] == 0:
        return "an empty batch"
    if residual is not None and act not in _POST_BINARY_OP:
        return f"oneDNN's binding has no {act} after a residual add"
    if is_tracing():
        return "its ops have no fake kernel, TorchScript or ONNX form"
    if _grad_needed(x, weight, scale, shift, residual):
        return "its ops have no autograd formula"
    return None


def _grad_needed(*tensors: Optional[Tensor]) -> bool:
    """Whether autograd would record an op on these tensors (None: absent)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# Packed weights kept per conv, one per input geometry (N, H, W), least recently used dropped.
MAX_PACKED_GEOMETRIES = 4


class Prepared:
    """A conv's BN-folded oneDNN weight and bias, for inputs of one dtype and output format.

    oneDNN picks its kernel and the weight's blocked layout for the input's size,
    and a weight packed for one size costs a reorder on every call of another. So the
    packed weight is kept per input geometry ``(N, H, W)``: the first geometry is
    packed at once; a later new one runs on the dense folded weight (which oneDNN
    reorders per call, as stock ``F.conv2d`` does with its weight) until it comes
    a second time, then gets its own packed copy, at most
    :data:`MAX_PACKED_GEOMETRIES` of them. Memory: one folded copy of the weight
    per repeated input size (one for a model fed one size), and while sizes seen
    only once run, one dense copy more.
    """

    def __init__(self, source: Tensor, scale: Tensor, bias: Tensor, dtype: torch.dtype, channels_last: bool,
                 conv: tuple, pack: bool, restride: bool) -> None:
        self._source, self._scale = source, scale  # the conv weight and BN scale (valid while the cache entry is)
        self.bias = bias  # shift, fp32
        self.bias_binary = bias if dtype == torch.float32 else bias.to(dtype)  # the binary post-op's dtype
        self.dtype = dtype  # compute dtype
        self.channels_last = channels_last  # run channels_last (output_route)
        self.restride = restride  # a 1x1 output returned with NCHW strides (output_route)
        self.conv = conv  # (padding, stride, dilation, groups) as oneDNN's ops take them
        self.pack = pack and channels_last  # oneDNN's PyTorch binding prepacks only for channels_last
        self.packed: "OrderedDict[tuple, Tensor]" = OrderedDict()  # geometry -> packed weight
        self._dense: Optional[Tensor] = None
        self._seen: set = set()  # geometries run once on the dense weight

    def _folded(self) -> Tensor:
        """weight * scale in fp32, rounded once to the compute dtype, in the output's format."""
        folded = (self._source.float() * self._scale.float().view(-1, 1, 1, 1)).to(self.dtype)
        return folded.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def dense(self) -> Tensor:
        if self._dense is None:
            self._dense = self._folded()
        return self._dense

    def weight(self, x: Tensor) -> Tensor:
        """The weight for input ``x``: packed for its geometry, or dense (see the class docstring)."""
        if not self.pack:
            return self.dense()
        geometry = (x.shape[0], x.shape[2], x.shape[3])
        w = self.packed.get(geometry)
        if w is not None:
            self.packed.move_to_end(geometry)
            return w
        if self.packed and geometry not in self._seen:
            self._seen.add(geometry)
            return self.dense()
        self._seen.discard(geometry)
        padding, stride, dilation, groups = self.conv
        dense = self._dense if self._dense is not None else self._folded()
        w = torch.ops.mkldnn._reorder_convolution_weight(dense, padding, stride, dilation, groups, list(x.shape))
        self.packed[geometry] = w
        self._dense = None  # folded again if another new size comes
        if len(self.packed) > MAX_PACKED_GEOMETRIES:
            self.packed.popitem(last=False)
        return w

    def nbytes(self) -> int:
        """Bytes of the copies held (a packed weight counted at its dense size)."""
        copies = len(self.packed) + (self._dense is not None)  # each of the weight's size in the compute dtype
        return copies * self._source.numel() * self.bias_binary.element_size() + 4 * self.bias.numel() + (
            0 if self.bias_binary is self.bias else self.bias_binary.numel() * self.bias_binary.element_size()
        )


def output_route(x: Tensor, weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int]) -> tuple:
    """``(channels_last, restride)``: whether the conv runs as channels_last (the packed-weight
    path) and whether its output then gets F.conv2d's NCHW strides. A 1x1 output is stored the
    same in both formats, so it always takes the packed path (an NCHW conv runs its dense weight,
    reordered per call, which on layer4 of a small input is several times slower); only its
    strides are F.conv2d's."""
    channels_last = _layout.conv_out_channels_last(x, weight)
    _, _, p, q = _conv.out_shape(x.shape, weight.shape, stride, padding, dilation)
    if channels_last or p * q != 1:
        return channels_last, False
    return True, True


def prepare(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, *, pack: bool = True,
) -> Prepared:
    """The folded weight for inputs like ``x`` (its dtype and memory format), packed for ``x``'s size.

    ``weight`` may be of any floating dtype (a module's fp32 weight under
    autocast: folded in fp32 before the one rounding). ``pack=False`` keeps
    the weight dense (one-off calls: oneDNN reorders it itself).
    """
    dtype = _COMPUTE[x.dtype]
    channels_last, restride = output_route(x, weight, stride, padding, dilation)
    conv = (list(padding), list(stride), list(dilation), groups)
    p = Prepared(weight, scale, shift.float().contiguous(), dtype, channels_last, conv, pack, restride)
    p.weight(x)
    return p


def run(p: Prepared, x: Tensor, residual: Optional[Tensor], act: str) -> Tensor:
    """``act(conv2d(x, folded) + shift (+ residual))`` in ``x.dtype`` and F.conv2d's memory format,
    for an ``x`` like the one ``p`` was prepared for (its compute dtype and output format)."""
    out_dtype = x.dtype
    if x.dtype != p.dtype:
        x = x.to(p.dtype)
    if p.channels_last:
        if not _layout.is_channels_last(x):
            x = x.contiguous(memory_format=torch.channels_last)
    elif not x.is_contiguous():
        x = x.contiguous()
    args = p.conv
    weight = p.weight(x)
    if residual is None:
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, p.bias, *args, _POST_OP[act], [], "")
    elif (p.dtype == torch.float32 or (p.channels_last and args[3] == 1)) and residual.shape[2] * residual.shape[3] > 1:
        r = residual.to(p.dtype)
        r = r.contiguous(memory_format=torch.channels_last if p.channels_last else torch.contiguous_format)
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, r, weight, p.bias_binary, *args, "add", None, _POST_BINARY_OP[act], [], None
        )
    else:
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, p.bias, *args, "none", [], "")
        y = reference.add_act(y.float(), residual, act)
    if y.dtype != out_dtype:
        y = y.to(out_dtype)
    if p.restride:  # a 1x1 output: the same memory, F.conv2d's NCHW strides
        y = y.as_strided(y.shape, (y.shape[1], 1, 1, 1))
    return y

def conv_bn_act(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, act: str,
) -> Tensor:
    """One call, prepared for it (``fastres.ops.conv_bn_act``'s oneDNN path)."""
    p = prepare(x, weight, scale, shift, stride, padding, dilation, groups, pack=False)
    return run(p, x, residual, act)


def conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
           dilation: Sequence[int], groups: int) -> Tensor:
    """``F.conv2d(x, weight, bias, ...)`` without a gradient: for a channels_last ``x`` of a dtype
    oneDNN computes natively, its convolution op with the dense weight (which it reorders per
    call, as ``F.conv2d`` does), else ``F.conv2d`` itself: oneDNN's convolution either way,
    but ``F.conv2d``'s route to it is slower for an input of few channels (a ResNet stem's
    three) and no faster otherwise. The output is channels_last, as ``F.conv2d``'s."""
    if (_AVAILABLE and type(x) is Tensor and x.device.type == "cpu" and _COMPUTE.get(x.dtype) == x.dtype
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype) and x.shape[0] > 0
            and _layout.is_channels_last(x) and not is_tracing() and not _grad_needed(x, weight, bias)):
        return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(padding), list(stride), list(dilation),
                                                       groups, "none", [], "")
    return torch.nn.functional.conv2d(x, weight, bias, stride, padding, dilation, groups)
