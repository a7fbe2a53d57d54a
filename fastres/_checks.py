"""Argument validation shared by the public API and the fake kernels.

Every check names the argument and the value it expected, so a bad call fails
with a message a user can act on, whichever backend would have run it.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

ACTIVATIONS = ("relu", "silu", "identity")
BACKENDS = ("torch", "triton", "cuda", "cudnn")
# float64 is accepted everywhere so that gradcheck can run on every backend.
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_DTYPE_NAMES = "float32, float16, bfloat16 (or float64)"


def check_activation(op: str, activation) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{op}: unknown activation {activation!r}; expected one of "
            + ", ".join(repr(a) for a in ACTIVATIONS)
        )


def check_backend_name(op: str, backend) -> None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(
            f"{op}: unknown backend {backend!r}; expected None (best available) or one of "
            + ", ".join(repr(b) for b in BACKENDS)
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
    if isinstance(v, int):
        v = (v, v)
    if (
        not isinstance(v, Sequence)
        or len(v) != 2
        or not all(isinstance(i, int) and not isinstance(i, bool) for i in v)
    ):
        raise ValueError(f"{op}: expected `{name}` to be an int or a pair of ints, got {v!r}")
    return tuple(v)
