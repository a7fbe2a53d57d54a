"""Triton kernels, one module per kernel family; importing them defines the
``torch.ops.fastres.*_triton`` custom ops."""
from fastres.triton import elementwise  # noqa: F401
from fastres.triton import conv  # noqa: F401
