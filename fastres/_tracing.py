"""Whether fastres code is being traced into a graph rather than run eagerly.

One predicate for every fast path that must stay out of graphs: the oneDNN
convolution (``fastres._onednn``: its ops have no fake kernel and cannot be
scripted or exported) and the eval-mode scale/shift cache (a cached tensor
baked into a graph would go stale). Under tracing, fastres runs its plain
reference ops, which every tracer and exporter understands.

:func:`is_tracing` covers ``torch.compile`` and ``torch.export`` (strict and non-strict), hence
``torch.onnx.export(dynamo=True)``; ``torch.jit.trace``, hence the TorchScript
ONNX exporter; FX symbolic tracing and ``make_fx``. Each test is a flag read
(well under a microsecond in all): it sits on the eager hot path.

:func:`is_fx_proxy` tells FX *symbolic* tracing (``torch.fx.symbolic_trace``,
torchvision's ``create_feature_extractor``), where inputs are ``Proxy``
objects: there, fastres modules run the module-by-module forward of the
library they replace, so the graph (and its node names) is that library's.
"""
from __future__ import annotations

import torch
import torch.fx._symbolic_trace as _fx

# The thread-local flag itself where it exists (torch >= 2.6); the public
# is_fx_tracing() of newer versions also logs a deprecation warning per call.
_fx_tracing = getattr(_fx, "_get_is_fx_tracing", _fx.is_fx_tracing)


def is_tracing() -> bool:
    """True inside torch.compile/export, torch.jit.trace (and both ONNX exporters) and FX tracing."""
    return torch.compiler.is_compiling() or is_jit_or_fx_tracing()


def is_jit_or_fx_tracing() -> bool:
    """True inside ``torch.jit.trace`` or FX tracing: tracers that record the ops an autograd
    function runs, not the function (torch.compile keeps it whole)."""
    return torch.jit.is_tracing() or _fx_tracing()


def is_fx_proxy(x) -> bool:
    """True when ``x`` is an FX ``Proxy`` (FX symbolic tracing)."""
    return isinstance(x, torch.fx.Proxy)
