"""fastres: fused conv-BN-activation, BN-activation and residual-add-activation
kernels (Triton and CUDA C++) for ResNets in PyTorch."""
from fastres import ops
from fastres.info import info

__version__ = "0.1.0"

__all__ = ["ops", "info", "__version__"]
