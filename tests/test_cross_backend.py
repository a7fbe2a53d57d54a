"""How far the backends may disagree (README, "Numerics across backends").

fastres does not make its backends agree to the last bit: on a GPU, Triton
contracts ``a * b + c`` into one FMA and computes ``exp`` and division with the
approximate instructions (the sm_90 PTX of triton 3.6 and 3.8 for ``x * s + b``
and silu holds ``fma.rn.f32``, ``ex2.approx.f32``, ``div.full.f32``), the CUDA kernels round
every operation (``__fmul_rn``, ``__fadd_rn``) and call ``expf``, and the
reference runs PyTorch's own kernels. The bound, per output element of the fp32
math before its one rounding to the output dtype:

    |a - b| <= 2^-21 * (|x * scale| + |shift| + |residual|)   (a few ulp of the largest term)
             + 2^-20 * |b|                                  (silu: exp and division)

and, after rounding to float16/bfloat16, one more ulp of the output (a rounding flip).
The convolutions add their own summation order on top (tests/conftest.py TOL).
Under the Triton interpreter (CPU) the kernels compute in numpy, one rounding per op.
"""
import pytest
import torch

from fastres import backends, ops

HAS_GPU = torch.cuda.is_available()
# Output ulp at 1.0 of each dtype (the rounding flip).
EPS = {torch.float32: 0.0, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def _usable(b):
    return HAS_GPU and backends.unavailable_reason(b, torch.device("cuda")) is None


def _bound(x, scale, shift, residual, ref, dtype):
    terms = (x.double() * scale.double().view(1, -1, 1, 1)).abs() + shift.double().abs().view(1, -1, 1, 1)
    if residual is not None:
        terms = terms + residual.double().abs()
    return 2.0**-21 * terms + (2.0**-20 + EPS[dtype]) * ref.double().abs() + 1e-30


@pytest.mark.skipif(not (_usable("triton") and _usable("cuda")), reason="needs a GPU with the triton and cuda backends")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_backends_agree_within_the_documented_bound(dtype, act, fmt):
    torch.manual_seed(0)
    x = (torch.randn(8, 64, 28, 28, device="cuda") * 4).to(dtype).contiguous(memory_format=fmt)
    r = torch.randn_like(x)
    scale = torch.rand(64, device="cuda") + 0.5
    shift = torch.randn(64, device="cuda")
    outs = {b: ops.bn_act(x, scale, shift, r, act, backend=b).double() for b in ("torch", "triton", "cuda")}
    bound = _bound(x, scale, shift, r, outs["torch"], dtype)
    for b in ("triton", "cuda"):
        err = (outs[b] - outs["torch"]).abs()
        assert (err <= bound).all(), f"{b}: worst excess {(err - bound).max().item():.3g}"
    adds = {b: ops.add_act(x, r, act, backend=b).double() for b in ("torch", "triton", "cuda")}
    zero = torch.zeros(64, device="cuda")
    bound = _bound(x, torch.ones(64, device="cuda"), zero, r, adds["torch"], dtype)
    for b in ("triton", "cuda"):
        assert ((adds[b] - adds["torch"]).abs() <= bound).all(), b
