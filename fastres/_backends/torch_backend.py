"""The ``"torch"`` backend: plain PyTorch on any device.

``bn_act`` runs on the CPU through fastres's CPU kernels, else BatchNorm's
vectorized CPU kernels where they give the reference's result, and a bf16/fp16
residual epilogue in the reference's fp32 roundings in fewer passes
(``fastres._cpu_bn``), and under autograd as one function with
the kernel ops' formula (it keeps what they keep); ``conv_bn_act`` runs CPU
inference through oneDNN's fused convolution with the BN folded into a prepared
weight (``fastres._onednn``), fp32 1x1 convs on few pixels as one matmul
(``fastres._cpu_gemm``) and other small fp32 convs as ATen's ``conv2d`` on the folded weight
(``fastres._cpu_small_conv``), and small bf16 convs where oneDNN has no bf16 as ATen's
``conv2d`` in bf16 before ``bn_act`` (``fastres._cpu_conv16``). Everything else is the reference
(``fastres.reference``).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastres import _cpu_bn, _cpu_conv16, _cpu_gemm, _cpu_small_conv, _layout, _onednn, _opdefs, reference
from fastres._backends.spec import Backend, Impl, first_supporting
from fastres._tracing import is_tracing


def _batchnorm_reason(x, scale, shift, residual, act) -> Optional[str]:
    return _cpu_bn.unsupported_reason(x, scale.dtype, residual, act)


def _native_reason(x, scale, shift, residual, act) -> Optional[str]:
    return _cpu_bn.native_reason(x, scale.dtype, residual, act)


_BN_ACT = [
    Impl("cpu-kernels", _cpu_bn.bn_act_native, supports=_native_reason),
    Impl("batchnorm-kernels", _cpu_bn.bn_act, supports=_batchnorm_reason),
    Impl("fp32-residual-epilogue", _cpu_bn.bn_act_residual, supports=_cpu_bn.residual_unsupported_reason),
    Impl("reference", reference.bn_act),
]
_BN_ACT_BACKWARD = [
    Impl("batchnorm-kernels", _cpu_bn.bn_act_backward,
         supports=lambda grad, x, scale, shift, residual, act, *_: _batchnorm_reason(x, scale, shift, residual, act)),
    Impl("reference", reference.bn_act_backward),
]


def _bn_act_forward(*args):
    return first_supporting(_BN_ACT, args)[0].fn(*args)


def _bn_act_backward(*args):
    return first_supporting(_BN_ACT_BACKWARD, args)[0].fn(*args)


class _BNActFunction(torch.autograd.Function):
    """``bn_act`` under autograd with the kernel ops' formula (``fastres._opdefs``): it keeps
    ``x`` and the residual, which its callers keep anyway; autograd through the
    reference's ops would keep their fp32 intermediates (two extra fp32 copies per
    call for a bf16 input)."""

    forward = staticmethod(_bn_act_forward)
    setup_context = staticmethod(_opdefs.bn_act_setup)
    backward = staticmethod(_opdefs.bn_act_autograd(_bn_act_backward))


def _autograd_reason(x, scale, shift, residual, act) -> Optional[str]:
    if not torch.is_grad_enabled() or is_tracing():
        return "no autograd graph is recorded"
    if any(t is not None and t.requires_grad for t in (x, scale, shift, residual)):
        return None
    return "no input requires grad"


def _gemm_prepare(source_weight, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cpu_gemm.prepare(x, source_weight, scale, shift)


def _gemm_run(form, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cpu_gemm.run(form, x, residual, act)


def _gemm(x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cpu_gemm.run(_cpu_gemm.prepare(x, weight, scale, shift), x, residual, act)


def _folded_form_key(x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return (x.dtype, _layout.conv_out_channels_last(x, weight))


def _small_prepare(source_weight, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cpu_small_conv.prepare(x, source_weight, scale, shift)


def _small_run(form, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cpu_small_conv.run(form, x, residual, act, stride, padding, dilation)


def _small(x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cpu_small_conv.run(_cpu_small_conv.prepare(x, weight, scale, shift), x, residual, act, stride, padding,
                               dilation)


def _conv16_prepare(source_weight, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _cpu_conv16.prepare(x, weight)


def _conv16_run(form, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _bn_act_forward(_cpu_conv16.conv(form, x, stride, padding, dilation, groups), scale, shift, residual, act)


def _conv16(x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _conv16_run(_cpu_conv16.prepare(x, weight), x, weight, scale, shift, residual, stride, padding, dilation,
                       groups, act)


def _onednn_reason(x, weight, scale, shift, residual, stride, padding, dilation, groups, act) -> Optional[str]:
    return _onednn.unsupported_reason(x, weight, scale, shift, residual, act)


def _onednn_prepare(source_weight, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _onednn.prepare(x, source_weight, scale, shift, stride, padding, dilation, groups)


def _onednn_run(form, x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return _onednn.run(form, x, residual, act)


def _onednn_form_key(x, weight, scale, shift, residual, stride, padding, dilation, groups, act):
    return (x.dtype, _layout.suggests_channels_last(x), _onednn.output_route(x, weight, stride, padding, dilation),
            tuple(stride), tuple(padding), tuple(dilation), groups)


BACKEND = Backend(
    name="torch",
    unavailable=lambda device: None,
    ops={
        "add_act": [Impl("reference", reference.add_act)],
        "bn_act": [Impl("autograd-formula", _BNActFunction.apply, supports=_autograd_reason), *_BN_ACT],
        "bn_act_backward": _BN_ACT_BACKWARD,
        "conv_bn_act": [
            Impl("gemm-1x1", _gemm, supports=_cpu_gemm.unsupported_reason, prepare=_gemm_prepare, run=_gemm_run,
                 form_key=_folded_form_key),
            Impl("small-conv", _small, supports=_cpu_small_conv.unsupported_reason, prepare=_small_prepare,
                 run=_small_run, form_key=_folded_form_key),
            Impl("conv16", _conv16, supports=_cpu_conv16.unsupported_reason, prepare=_conv16_prepare,
                 run=_conv16_run, form_key=_folded_form_key),
            Impl("onednn", _onednn.conv_bn_act, supports=_onednn_reason, prepare=_onednn_prepare, run=_onednn_run,
                 form_key=_onednn_form_key),
            Impl("reference", reference.conv_bn_act),
        ],
    },
    preference={"cuda": 3, "*": 0},
)
