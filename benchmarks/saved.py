"""Bytes saved for backward: what a training step keeps alive between its forward and backward.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` as the bytes of the
distinct storages that autograd saves during ``fn(*args)`` (a tensor saved by
several ops, or views of one storage, count once), so the count is the same on
every device and needs no timing. Storages of ``exclude`` (e.g. the model's
parameters, which every implementation keeps alike) can be left out.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch


def saved_bytes(fn: Callable, *args, exclude: Iterable[torch.Tensor] = ()) -> Tuple[int, object]:
    """``(bytes of distinct storages saved for backward during fn(*args), fn's result)``."""
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
    seen: Dict[Tuple[torch.device, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in skip:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out
