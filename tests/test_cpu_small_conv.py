"""The ``"torch"`` backend's small-conv path of ``conv_bn_act`` (fastres/_cpu_small_conv.py): which
calls it takes, and that it computes the reference's result with F.conv2d's output strides."""
import pytest
import torch
import torchvision

import fastres
from fastres import _cpu_small_conv, backends, ops, reference

CL = torch.channels_last
NCHW = torch.contiguous_format


def _args(n, c, k, h, w, x_fmt, w_fmt, residual, kernel=3, stride=1, padding=1):
    g = torch.Generator().manual_seed(n * 131 + c * 7 + h + kernel)
    x = torch.randn(n, c, h, w, generator=g).contiguous(memory_format=x_fmt)
    weight = (torch.randn(k, c, kernel, kernel, generator=g) / (c * kernel * kernel) ** 0.5).contiguous(memory_format=w_fmt)
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    out = torch.nn.functional.conv2d(x, weight, None, stride, padding)
    r = torch.randn(out.shape, generator=g).contiguous(memory_format=x_fmt) if residual else None
    return x, weight, scale, shift, r


CASES = {  # (n, c, k, h, w, x format, weight format, kernel, stride, padding)
    "3x3-cl": (1, 64, 64, 4, 4, CL, CL, 3, 1, 1),
    "3x3-nchw": (1, 64, 64, 4, 4, NCHW, NCHW, 3, 1, 1),
    "3x3-s2-odd": (1, 16, 24, 7, 9, CL, CL, 3, 2, 1),
    "3x3-one-pixel": (2, 32, 16, 1, 1, NCHW, NCHW, 3, 1, 1),
    "1x1-s2": (1, 32, 64, 4, 4, CL, CL, 1, 2, 0),
    "nchw-x-cl-weight": (1, 16, 16, 5, 5, NCHW, CL, 3, 1, 1),
    "cl-x-nchw-weight": (1, 16, 16, 5, 5, CL, NCHW, 3, 1, 1),
}


@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_with_conv2d_strides(case, residual, act):
    n, c, k, h, w, x_fmt, w_fmt, kernel, s, p = CASES[case]
    x, weight, scale, shift, r = _args(n, c, k, h, w, x_fmt, w_fmt, residual, kernel, s, p)
    args = (x, weight, scale, shift, r, (s, s), (p, p), (1, 1), 1, act)
    assert backends.select("conv_bn_act", "conv_bn_act", "torch", args).name == "small-conv"
    with torch.inference_mode():
        out = ops.conv_bn_act(x, weight, scale, shift, r, stride=(s, s), padding=(p, p), activation=act,
                              backend="torch")
        expected = reference.conv_bn_act(x, weight, scale, shift, r, (s, s), (p, p), (1, 1), 1, act)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert out.stride() == torch.nn.functional.conv2d(x, weight, None, s, p).stride()


def test_nan_propagates_through_relu():
    x, weight, scale, shift, _ = _args(1, 16, 8, 4, 4, CL, CL, False)
    x[0, :, 0, 0] = float("nan")
    with torch.inference_mode():
        out = ops.conv_bn_act(x, weight, scale, shift, None, padding=1, activation="relu", backend="torch")
    assert out[0, :, :2, :2].isnan().all() and not out[0, :, 3, 3].isnan().any()


@pytest.mark.parametrize("case,reason", [
    (dict(dtype=torch.bfloat16), "fp32"),
    (dict(shape=(1, 3, 64, 16, 16)), "input channels"),
    (dict(groups=2), "grouped"),
    (dict(shape=(1, 64, 64, 14, 14)), "multiply-adds"),
    (dict(shape=(1, 512, 512, 1, 1)), "weight elements"),
    (dict(grad=True), "gradient"),
], ids=["bf16", "stem", "grouped", "much-work", "large-3x3-weight", "grad"])
def test_refusals_name_the_reason(case, reason):
    n, c, k, h, w = case.get("shape", (1, 16, 16, 4, 4))
    groups = case.get("groups", 1)
    x, weight, scale, shift, r = _args(n, c, k, h, w, CL, CL, False)
    weight = weight[:, : c // groups]
    x = x.to(case.get("dtype", torch.float32)).requires_grad_(case.get("grad", False))
    why = _cpu_small_conv.unsupported_reason(x, weight, scale, shift, r, (1, 1), (1, 1), (1, 1), groups, "relu")
    assert why is not None and reason in why


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["cl", "nchw"])
def test_model_after_other_sizes_matches_torchvision(fmt):
    """A model run on a small input (small-conv and 1x1-matmul paths) then a larger one (oneDNN), then
    the small one again, gives torchvision's logits every time."""
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).eval().to(memory_format=fmt)
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = fastres.convert(torchvision.models.resnet18(num_classes=10).eval().to(memory_format=fmt), warn=False)
    model.load_state_dict(base.state_dict())
    small, large = (torch.randn(1, 3, s, s).contiguous(memory_format=fmt) for s in (16, 64))
    with torch.no_grad():
        for x in (small, large, small):
            torch.testing.assert_close(model(x), base(x), rtol=1e-4, atol=1e-4)
    kinds = {kind for u in fastres.nn.modules.fused_modules(model) for (_, kind) in u._fastres_cache._entries}
    assert {"small-conv", "onednn"} <= kinds
