"""Shared test setup.

Without a GPU, the Triton kernels run on CPU tensors under the Triton
interpreter: TRITON_INTERPRET=1 must be set before triton is imported, so it
is set here, before anything imports fastres.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastres  # noqa: E402
from fastres import backends  # noqa: E402

DEVICE = backends.default_device()

# Per-dtype tolerances for kernels that compute in fp32 and round once, compared
# with the fp32 reference rounded once: results differ only by the order of fp32
# operations (and exp implementations for silu), i.e. at most ~1 ulp of the
# output dtype.
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float16: dict(rtol=1e-3, atol=1e-3),
    torch.bfloat16: dict(rtol=8e-3, atol=8e-3),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
ACTIVATIONS = list(fastres._checks.ACTIVATIONS)
FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


def kernel_backends(op):
    """The non-reference backends of ``op``, each skipped (with the reason) where unusable here."""
    out = []
    for b in ("triton", "cuda"):
        reason = backends.unavailable_reason(b, DEVICE)
        if reason is None and b not in fastres.ops.implemented_backends(op):
            reason = f"{op} has no {b} backend in this build"
        out.append(pytest.param(b, id=b, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def all_backends(op):
    return [pytest.param("torch", id="torch"), *kernel_backends(op)]
