"""The op families' fake kernels and autograd formulas, defined once and registered for
every backend's custom op of the family (``torch.ops.fastres.<op>_<backend>``).

==========================================  ===========================================
op                                          computes
==========================================  ===========================================
``add_act_<backend>``                       ``act(x + residual)``
``add_act_backward_<backend>``              ``grad * act'(x + residual)``
``bn_act_<backend>``                        ``act(x * scale[c] + shift[c] (+ residual))``
``bn_act_backward_<backend>``               ``(grad_x, grad_z, grad_scale, grad_shift, y)``
``conv_bn_act_<backend>``                   ``act(conv2d(x, w) * scale[k] + shift[k] (+ r))``
==========================================  ===========================================

The schemas are the kernels' own (``fastres/triton/``, ``csrc/bindings.cpp``); the
backward of ``conv_bn_act`` recomputes the convolution, runs the family's fused
``bn_act`` backward and aten's convolution backward.
"""
from __future__ import annotations

import torch

from fastres import _checks, _conv, _layout


def add_act_fake(x, residual, activation):
    _checks.check_add_act("add_act", x, residual, activation)
    return torch.empty_like(_layout.dense(x))


def add_act_backward_fake(grad, x, residual, activation):
    return torch.empty_like(_layout.dense(x))


def bn_act_fake(x, scale, shift, residual, activation):
    _checks.check_bn_act("bn_act", x, scale, shift, residual, activation)
    return torch.empty_like(_layout.dense(x))


def bn_act_backward_fake(grad, x, scale, shift, residual, activation, residual_grad, output=False):
    x = _layout.dense(x)
    grad_z = torch.empty_like(x) if residual_grad else x.new_empty(0)
    y = torch.empty_like(x) if output else x.new_empty(0)
    return torch.empty_like(x), grad_z, torch.empty_like(scale), torch.empty_like(shift), y


def conv_bn_act_fake(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation):
    _checks.check_conv_bn_act("conv_bn_act", x, weight, scale, shift, residual, stride, padding, dilation, groups,
                              activation)
    return _conv.empty_output(x, weight, stride, padding, dilation)


def add_act_setup(ctx, inputs, output):
    x, residual, activation = inputs
    ctx.save_for_backward(x, residual)
    ctx.activation = activation


def add_act_autograd(backward_op):
    def backward(ctx, grad):
        x, residual = ctx.saved_tensors
        grad_z = backward_op(grad, x, residual, ctx.activation)
        need = ctx.needs_input_grad
        return (grad_z if need[0] else None), (grad_z if need[1] else None), None

    return backward


def bn_act_setup(ctx, inputs, output):
    x, scale, shift, residual, activation = inputs
    ctx.save_for_backward(x, scale, shift, residual)
    ctx.activation = activation


def bn_act_autograd(backward_op):
    def backward(ctx, grad):
        x, scale, shift, residual = ctx.saved_tensors
        need = ctx.needs_input_grad
        residual_grad = residual is not None and need[3]
        gx, gz, gscale, gshift, _ = backward_op(grad, x, scale, shift, residual, ctx.activation, residual_grad)
        return (
            gx if need[0] else None,
            gscale if need[1] else None,
            gshift if need[2] else None,
            gz if residual_grad else None,
            None,
        )

    return backward


def conv_bn_act_setup(ctx, inputs, output):
    x, weight, scale, shift, residual, stride, padding, dilation, groups, activation = inputs
    ctx.save_for_backward(x, weight, scale, shift, residual)
    ctx.conv = (list(stride), list(padding), list(dilation), groups)
    ctx.activation = activation


def conv_bn_act_autograd(bn_act_backward_op):
    """Backward of the fused conv: recompute the conv, fused BN/act backward, aten conv backward."""

    def backward(ctx, grad):
        x, weight, scale, shift, residual = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        need = ctx.needs_input_grad
        conv = torch.nn.functional.conv2d(x, weight, None, stride, padding, dilation, groups)
        residual_grad = residual is not None and need[4]
        gconv, gz, gscale, gshift, _ = bn_act_backward_op(
            grad, conv, scale, shift, residual, ctx.activation, residual_grad
        )
        gx = gw = None
        if need[0] or need[1]:
            gx, gw, _ = _conv.backward(gconv, x, weight, None, stride, padding, dilation, groups,
                                       [need[0], need[1], False])
        return (
            gx,
            gw,
            gscale if need[2] else None,
            gshift if need[3] else None,
            gz if residual_grad else None,
            None, None, None, None, None,
        )

    return backward


def _defined(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"fastres::{name}", "")
    except RuntimeError:
        return False
    return True


_FAMILIES = {  # op -> (fake, setup_context, autograd factory, backward op family and its fake or None)
    "add_act": (add_act_fake, add_act_setup, add_act_autograd, ("add_act_backward", add_act_backward_fake)),
    "bn_act": (bn_act_fake, bn_act_setup, bn_act_autograd, ("bn_act_backward", bn_act_backward_fake)),
    "conv_bn_act": (conv_bn_act_fake, conv_bn_act_setup, conv_bn_act_autograd, None),
}


def register_kernel_ops(suffix: str) -> dict:
    """Register the fake kernel and autograd of every defined ``fastres::<op>_<suffix>``;
    returns ``{op: custom op}`` for the families defined (their backward ops included)."""
    found = {}
    for op, (fake, setup, autograd, backward) in _FAMILIES.items():
        name = f"{op}_{suffix}"
        if not _defined(name):
            continue
        torch.library.register_fake(f"fastres::{name}")(fake)
        if backward is not None:
            bwd_family, bwd_fake = backward
            torch.library.register_fake(f"fastres::{bwd_family}_{suffix}")(bwd_fake)
            found[bwd_family] = getattr(torch.ops.fastres, f"{bwd_family}_{suffix}")
        bwd_op = getattr(torch.ops.fastres, f"bn_act_backward_{suffix}")
        torch.library.register_autograd(f"fastres::{name}", autograd(found.get(f"{op}_backward", bwd_op)),
                                        setup_context=setup)
        found[op] = getattr(torch.ops.fastres, name)
    return found
