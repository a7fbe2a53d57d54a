"""The ``"cudnn"`` backend of ``conv_bn_act``: cuDNN's fused convolution with the BN folded
into the weight (``fastres._cudnn``), for the epilogues cuDNN fuses; every other call runs
on the ``"stock"`` backend (PyTorch's convolution, then ``bn_act``)."""
from __future__ import annotations

from typing import Optional

import torch

from fastres import _cudnn, _layout
from fastres._backends.spec import Backend, Impl


def unavailable_reason(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cudnn backend needs CUDA tensors, got {device.type} tensors"
    if not torch.backends.cudnn.is_available():
        return "this PyTorch build has no cuDNN (torch.backends.cudnn.is_available() is False)"
    if not torch.backends.cudnn.enabled:
        return "cuDNN is disabled (torch.backends.cudnn.enabled is False)"
    return None


def _fused_reason(x, weight, scale, shift, residual, stride, padding, dilation, groups, act) -> Optional[str]:
    if _cudnn.fused_form(x.dtype, act):
        return None
    return f"cuDNN's fused conv has no {act} epilogue in {x.dtype}"


def _prepare(source_weight, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cudnn.fold_bn(weight, scale, shift)


def _run(form, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cudnn.conv_bias_relu(x, *form, residual, stride, padding, dilation, groups)


def _fused(*args):
    return _run(_prepare(None, *args), *args)


def _form_key(x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return (weight.dtype, _layout.suggests_channels_last(weight))


BACKEND = Backend(
    name="cudnn",
    unavailable=unavailable_reason,
    ops={"conv_bn_act": [Impl("cudnn", _fused, supports=_fused_reason, prepare=_prepare, run=_run,
                              form_key=_form_key)]},
    preference={"cuda": 2},
    tune=(0, 0),  # the stock model's own conv with the BN and activation passes fused away
    fallback="stock",
)
