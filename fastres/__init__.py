"""fastres: fused conv-BN-activation, BN-activation and residual-add-activation
kernels (Triton and CUDA C++) for ResNets in PyTorch."""
from fastres import ops
from fastres._info import info
from fastres import models, nn
from fastres.convert import convert  # the function shadows the module fastres.convert
from fastres.nn import set_backend, set_training_memory

__version__ = "0.1.0"

__all__ = ["ops", "info", "__version__", "nn", "models", "convert", "set_backend", "set_training_memory"]
