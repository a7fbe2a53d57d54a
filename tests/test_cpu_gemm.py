"""The ``"torch"`` backend's 1x1-matmul path of ``conv_bn_act`` (fastres/_cpu_gemm.py): which
calls it takes, and that it computes the reference's result with F.conv2d's output strides."""
import pytest
import torch

from fastres import _cpu_gemm, backends, ops, reference

CL = torch.channels_last


def _args(n, c, k, h, w, fmt, residual, kernel=1, stride=1):
    g = torch.Generator().manual_seed(n * 131 + c * 7 + h)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=fmt)
    weight = torch.randn(k, c, kernel, kernel, generator=g).contiguous(memory_format=fmt)
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    oh, ow = (h - kernel) // stride + 1, (w - kernel) // stride + 1
    r = torch.randn(n, k, oh, ow, generator=g).contiguous(memory_format=fmt) if residual else None
    return x, weight, scale, shift, r


@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("shape,fmt", [((1, 64, 16, 2, 2), CL), ((3, 24, 40, 1, 1), CL),
                                       ((2, 24, 40, 1, 1), torch.contiguous_format), ((1, 3, 5, 7, 9), CL)],
                         ids=["cl-2x2", "cl-1x1", "nchw-1x1", "cl-odd"])
def test_matches_reference_with_conv2d_strides(shape, fmt, residual, act):
    x, weight, scale, shift, r = _args(*shape, fmt, residual)
    args = (x, weight, scale, shift, r, (1, 1), (0, 0), (1, 1), 1, act)
    assert backends.select("conv_bn_act", "conv_bn_act", "torch", args).name == "gemm-1x1"
    with torch.inference_mode():
        out = ops.conv_bn_act(x, weight, scale, shift, r, activation=act, backend="torch")
        expected = reference.conv_bn_act(x, weight, scale, shift, r, (1, 1), (0, 0), (1, 1), 1, act)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.stride() == torch.nn.functional.conv2d(x, weight).stride()


def test_nan_propagates_through_relu():
    x, weight, scale, shift, _ = _args(1, 8, 4, 2, 2, CL, False)
    x[0, :, 0, 0] = float("nan")
    with torch.inference_mode():
        out = ops.conv_bn_act(x, weight, scale, shift, None, activation="relu", backend="torch")
    assert out[0, :, 0, 0].isnan().all() and not out[0, :, 1, 1].isnan().any()


@pytest.mark.parametrize("case,reason", [
    (dict(shape=(1, 8, 4, 2, 2), dtype=torch.bfloat16), "fp32"),
    (dict(shape=(1, 8, 4, 9, 9)), "pixels"),
    (dict(shape=(1, 8, 4, 3, 3), kernel=3), "1x1"),
    (dict(shape=(1, 8, 4, 4, 4), stride=2), "1x1"),
    (dict(shape=(1, 8, 4, 2, 2), fmt=torch.contiguous_format), "NCHW output"),
    (dict(shape=(1, 8, 4, 2, 2), grad=True), "gradient"),
], ids=["bf16", "many-pixels", "3x3", "stride-2", "nchw-2x2", "grad"])
def test_refusals_name_the_reason(case, reason):
    x, weight, scale, shift, r = _args(*case["shape"], case.get("fmt", CL), False, case.get("kernel", 1),
                                       case.get("stride", 1))
    x = x.to(case.get("dtype", torch.float32)).requires_grad_(case.get("grad", False))
    s = case.get("stride", 1)
    why = _cpu_gemm.unsupported_reason(x, weight, scale, shift, r, (s, s), (0, 0), (1, 1), 1, "relu")
    assert why is not None and reason in why
