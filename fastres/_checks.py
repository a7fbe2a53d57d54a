"""Argument validation shared by the public API and the fake kernels.

Every check names the argument and the value it expected, so a bad call fails
with a message a user can act on, whichever backend would have run it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from fastres import _conv

ACTIVATIONS = ("relu", "silu", "identity")
# float64 is accepted everywhere so that gradcheck can run on every backend.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 (or float64)"


def check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown activation {activation!r}; expected one of "
            + ", ".join(repr(a) for a in ACTIVATIONS)
        )


def _shape(t: torch.Tensor) -> tuple:
    return tuple(t.shape)


def check_input(op: str, name: str, t, ndim: Optional[int] = None) -> None:
    """``t`` is a floating tensor of a supported dtype (and rank ``ndim`` if given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected `{name}` to be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        layout = {4: " (N, C, H, W)"}.get(ndim, "")
        raise ValueError(
            f"{op}: expected `{name}` to be a {ndim}-D{layout} tensor, got {t.dim()}-D "
            f"with shape {_shape(t)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: expected `{name}` to have dtype {_DTYPE_NAMES}, got {t.dtype}")


def check_like(op: str, name: str, t, ref: torch.Tensor, ref_name: str = "x") -> None:
    """``t`` has exactly the shape, dtype and device of ``ref``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected `{name}` to be a torch.Tensor, got {type(t).__name__}")
    if _shape(t) != _shape(ref):
        raise ValueError(
            f"{op}: expected `{name}` to have the shape of `{ref_name}`, {_shape(ref)}, "
            f"got {_shape(t)}"
        )
    if t.dtype != ref.dtype:
        raise ValueError(
            f"{op}: expected `{name}` to have the dtype of `{ref_name}`, {ref.dtype}, got {t.dtype}"
        )
    check_device(op, name, t, ref, ref_name)


def check_device(op: str, name: str, t: torch.Tensor, ref: torch.Tensor, ref_name: str = "x") -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{op}: expected `{name}` on the device of `{ref_name}`, {ref.device}, got {t.device}"
        )


def check_channel_vector(op: str, name: str, t, x: torch.Tensor, channels: int) -> None:
    """``t`` is a 1-D float32 vector of length ``channels`` on ``x``'s device.

    float64 is accepted when ``x`` is float64 (gradcheck).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: expected `{name}` to be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != channels:
        raise ValueError(
            f"{op}: expected `{name}` to be a 1-D tensor of length {channels} (one value per "
            f"output channel), got shape {_shape(t)}"
        )
    allowed = (torch.float32, torch.float64) if x.dtype == torch.float64 else (torch.float32,)
    if t.dtype not in allowed:
        raise ValueError(
            f"{op}: expected `{name}` to be float32 (BN scale and shift stay in fp32 whatever "
            f"the input dtype), got {t.dtype}"
        )
    check_device(op, name, t, x)


def pair(op: str, name: str, v) -> tuple:
    """Normalize an int-or-pair conv argument to a tuple of two non-negative ints."""
    if type(v) is tuple and len(v) == 2 and type(v[0]) is int and type(v[1]) is int:
        return v
    if isinstance(v, int):
        v = (v, v)
    if (
        not isinstance(v, Sequence)
        or len(v) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ):
        raise ValueError(f"{op}: expected `{name}` to be an int or a pair of ints, got {v!r}")
    return tuple(v)


def check_add_act(op: str, x, residual, activation) -> None:
    check_input(op, "x", x)
    check_like(op, "residual", residual, x)
    check_activation(op, activation)


def check_bn_act(op: str, x, scale, shift, residual, activation) -> None:
    check_input(op, "x", x, ndim=4)
    check_channel_vector(op, "scale", scale, x, x.shape[1])
    check_channel_vector(op, "shift", shift, x, x.shape[1])
    if residual is not None:
        check_like(op, "residual", residual, x)
    check_activation(op, activation)


def check_conv_bn_act(op: str, x, weight, scale, shift, residual, stride, padding, dilation, groups, activation):
    """Validates a ``conv_bn_act`` call; returns the normalized ``(stride, padding, dilation)``."""
    check_input(op, "x", x, ndim=4)
    check_input(op, "weight", weight, ndim=4)
    if weight.dtype != x.dtype:
        raise ValueError(f"{op}: expected `weight` to have the dtype of `x`, {x.dtype}, got {weight.dtype}")
    check_device(op, "weight", weight, x)
    stride, padding, dilation = (pair(op, n, v) for n, v in (("stride", stride), ("padding", padding), ("dilation", dilation)))
    if min(stride) < 1 or min(dilation) < 1 or min(padding) < 0:
        raise ValueError(
            f"{op}: expected stride >= 1, padding >= 0 and dilation >= 1, got "
            f"stride={stride}, padding={padding}, dilation={dilation}"
        )
    if not isinstance(groups, int) or groups < 1:
        raise ValueError(f"{op}: expected `groups` to be a positive int, got {groups!r}")
    why = _conv.mismatch(x, weight, stride, padding, dilation, groups)
    if why is not None:
        raise ValueError(f"{op}: {why}")
    check_channel_vector(op, "scale", scale, x, weight.shape[0])
    check_channel_vector(op, "shift", shift, x, weight.shape[0])
    if residual is not None:
        check_input(op, "residual", residual)
        why = _conv.residual_mismatch(residual, x, weight, stride, padding, dilation)
        if why is not None:
            raise ValueError(f"{op}: {why}")
        check_device(op, "residual", residual, x)
    check_activation(op, activation)
    return stride, padding, dilation
