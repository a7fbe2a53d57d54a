"""Whether a tracer is recording the current call (placeholder until i11's shared predicate is merged)."""
from __future__ import annotations

import torch


def tracing() -> bool:
    """True under torch.compile/torch.export, ``torch.jit.trace`` and FX symbolic tracing."""
    if torch.compiler.is_compiling():  # torch.compile and torch.export
        return True
    if torch.jit.is_tracing():
        return True
    fx = torch.fx._symbolic_trace
    return getattr(fx, "is_fx_symbolic_tracing", fx.is_fx_tracing)()
