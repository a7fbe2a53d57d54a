"""Shared test setup.

Without a GPU, the Triton kernels run on CPU tensors under the Triton
interpreter: TRITON_INTERPRET=1 must be set before triton is imported, so it
is set here, before anything imports fastres.
"""
import dataclasses
import os
from dataclasses import dataclass
from typing import Tuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastres  # noqa: E402
from fastres import backends  # noqa: E402
from fastres._conv import out_size as conv_out_size  # noqa: E402

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
        if reason is None and b not in backends.implemented_backends(op):
            reason = f"{op} has no {b} backend in this build"
        out.append(pytest.param(b, id=b, marks=pytest.mark.skipif(reason is not None, reason=str(reason))))
    return out


def all_backends(op):
    return [pytest.param("torch", id="torch"), *kernel_backends(op)]


@pytest.fixture
def onednn_16bit(monkeypatch):
    """bf16 CPU convs of little work on oneDNN's path also where oneDNN computes bf16 in fp32 (there
    they take ``fastres._cpu_conv16``): for the tests of oneDNN's path and forms."""
    from fastres import _cpu_conv16

    monkeypatch.setattr(_cpu_conv16, "MAX_MACS", 0)


def replace_impl(monkeypatch, backend: str, op: str, name: str, **changes):
    """Replace fields of one registered implementation (``fastres.backends.REGISTRY``) for a test."""
    impls = list(backends.REGISTRY[backend].ops[op])
    i = next(i for i, impl in enumerate(impls) if impl.name == name)
    impls[i] = dataclasses.replace(impls[i], **changes)
    monkeypatch.setitem(backends.REGISTRY[backend].ops, op, impls)
    return impls[i]


@dataclass(frozen=True)
class ConvCase:
    """A convolution for the kernel tests: input (n, c, h, w), weight (k, c/groups, r, s)."""

    n: int
    c: int
    h: int
    w: int
    k: int
    r: int
    s: int
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    name: str = ""

    @staticmethod
    def of(cs, batch: int) -> "ConvCase":
        """The geometry of a ``fastres.shapes.ConvShape`` at another batch size (unnamed,
        so equal geometries of different networks compare equal)."""
        return ConvCase(batch, cs.C, cs.H, cs.W, cs.K, cs.R, cs.S, (cs.stride,) * 2, (cs.padding,) * 2,
                        (cs.dilation,) * 2, cs.groups)

    def conv_args(self):
        return list(self.stride), list(self.padding), list(self.dilation), self.groups

    def out_shape(self):
        p, q = (conv_out_size(size, kk, st, pad, d) for size, kk, st, pad, d in
                zip((self.h, self.w), (self.r, self.s), self.stride, self.padding, self.dilation))
        return (self.n, self.k, p, q)


def conv_inputs(case: ConvCase, dtype, fmt="nhwc", residual=True, res_fmt=None, device=DEVICE):
    """``(x, weight, scale, shift, residual or None)``: x in ``fmt``, the residual in
    ``res_fmt`` (default ``fmt``), weights scaled by 1/sqrt(fan-in), fp32 scale/shift."""
    x = torch.randn(case.n, case.c, case.h, case.w, device=device).to(dtype)
    fan_in = case.c // case.groups * case.r * case.s
    w = (torch.randn(case.k, case.c // case.groups, case.r, case.s, device=device) / fan_in**0.5).to(dtype)
    scale = torch.rand(case.k, device=device) + 0.5
    shift = torch.randn(case.k, device=device) * 0.5
    r = torch.randn(case.out_shape(), device=device).to(dtype) if residual else None
    x = x.contiguous(memory_format=FORMATS[fmt])
    if r is not None:
        r = r.contiguous(memory_format=FORMATS[res_fmt or fmt])
    return x, w, scale, shift, r
