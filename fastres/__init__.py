"""fastres: fused conv-BN-activation, BN-activation and residual-add-activation
kernels (Triton and CUDA C++) for ResNets in PyTorch.

The functional layer (``fastres.ops``) is imported with the package; the module
layers above it (``fastres.nn``, ``fastres.models``, ``fastres.convert``) on
first use, so that a low-level import never loads them.
"""
import importlib

from fastres import ops
from fastres._info import info
from fastres._version import __version__

# name -> (module, attribute of it or None for the module itself)
_LAZY = {
    "nn": ("fastres.nn", None),
    "models": ("fastres.models", None),
    "convert": ("fastres.convert", "convert"),  # the function (the module is callable as it, too)
    "set_backend": ("fastres.nn", "set_backend"),
    "set_training_memory": ("fastres.nn", "set_training_memory"),
}

__all__ = ["ops", "info", "__version__", "nn", "models", "convert", "set_backend", "set_training_memory"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'fastres' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    value = value if attr is None else getattr(value, attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
