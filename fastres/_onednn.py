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

:func:`prepare` makes that weight (and prepacks it into oneDNN's blocked
layout for channels_last outputs); ``fastres.nn`` modules cache it per conv
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

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from fastres import _layout, reference
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
    if torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or scale.requires_grad or shift.requires_grad
        or (residual is not None and residual.requires_grad)
    ):
        return "its ops have no autograd formula"
    return None


class Prepared(NamedTuple):
    """A conv's BN-folded oneDNN weight and bias, for inputs like the one it was prepared for."""

    weight: Tensor  # weight * scale (fp32 math), rounded once to `dtype`; prepacked when `channels_last`
    bias: Tensor  # shift, fp32
    bias_binary: Tensor  # shift in `dtype` (the binary post-op needs the input's dtype)
    dtype: torch.dtype  # compute dtype
    channels_last: bool  # output format (F.conv2d's rule for the original x and weight)
    conv: tuple  # (padding, stride, dilation, groups) as oneDNN's ops take them

    def nbytes(self) -> int:
        """Bytes of this prepared copy (the prepacked weight counted at its dense size)."""
        return self.weight.numel() * self.weight.element_size() + 4 * self.bias.numel() + (
            0 if self.bias_binary is self.bias else self.bias_binary.numel() * self.bias_binary.element_size()
        )


def prepare(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor,
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, *, pack: bool = True,
) -> Prepared:
    """The folded weight for inputs like ``x`` (its dtype, memory format; its size is a hint).

    ``weight`` may be of any floating dtype (a module's fp32 weight under
    autocast: folded in fp32 before the one rounding). ``pack=False`` keeps
    the weight dense (one-off calls: oneDNN reorders it itself).
    """
    dtype = _COMPUTE[x.dtype]
    channels_last = _layout.conv_out_channels_last(x, weight)
    folded = (weight.float() * scale.float().view(-1, 1, 1, 1)).to(dtype)
    if channels_last and pack:
        folded = torch.ops.mkldnn._reorder_convolution_weight(
            folded.contiguous(memory_format=torch.channels_last), list(padding), list(stride), list(dilation),
            groups, list(x.shape),
        )
    elif channels_last:
        folded = folded.contiguous(memory_format=torch.channels_last)
    else:
        folded = folded.contiguous()
    bias = shift.float().contiguous()
    conv = (list(padding), list(stride), list(dilation), groups)
    return Prepared(folded, bias, bias if dtype == torch.float32 else bias.to(dtype), dtype, channels_last, conv)


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
    if residual is None:
        y = torch.ops.mkldnn._convolution_pointwise(x, p.weight, p.bias, *args, _POST_OP[act], [], "")
        return y if y.dtype == out_dtype else y.to(out_dtype)
    if (p.dtype == torch.float32 or (p.channels_last and args[3] == 1)) and residual.shape[2] * residual.shape[3] > 1:
        r = residual.to(p.dtype)
        r = r.contiguous(memory_format=torch.channels_last if p.channels_last else torch.contiguous_format)
        y = torch.ops.mkldnn._convolution_pointwise.binary(
            x, r, p.weight, p.bias_binary, *args, "add", None, _POST_BINARY_OP[act], [], None
        )
        return y if y.dtype == out_dtype else y.to(out_dtype)
    y = torch.ops.mkldnn._convolution_pointwise(x, p.weight, p.bias, *args, "none", [], "")
    return reference.add_act(y.float(), residual, act).to(out_dtype)


def conv_bn_act(
    x: Tensor, weight: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor],
    stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int], groups: int, act: str,
) -> Tensor:
    """One call, prepared for it (``fastres.ops.conv_bn_act``'s oneDNN path)."""
    p = prepare(x, weight, scale, shift, stride, padding, dilation, groups, pack=False)
    return run(p, x, residual, act)
