"""Autocast for the fused ops: custom ops do not autocast, so fastres.nn casts as ``F.conv2d`` would."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype in force for ``x``'s device (CPU or CUDA), or None."""
    dev = x.device.type
    if dev in ("cpu", "cuda") and torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return None


def cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """``t`` in ``dtype`` (fp64 tensors and a None ``dtype`` unchanged, as under autocast)."""
    if t is None or dtype is None or t.dtype == dtype or t.dtype == torch.float64:
        return t
    return t.to(dtype)
