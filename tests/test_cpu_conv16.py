"""The ``"torch"`` backend's 16-bit conv path of ``conv_bn_act`` (fastres/_cpu_conv16.py), for CPUs
where oneDNN computes bf16 in fp32 (simulated here where it has it): which calls it takes,
and that it computes the reference's result, up to the conv's rounding, with F.conv2d's strides."""
import pytest
import torch
import torchvision

import fastres
from fastres import _cpu_conv16, _onednn, backends, ops, reference

CL = torch.channels_last
NCHW = torch.contiguous_format


@pytest.fixture
def no_native_16bit(monkeypatch):
    """oneDNN as on a CPU without AVX512-BF16/FP16 or AMX: bf16 and fp16 computed in fp32."""
    if _onednn.compute_dtype(torch.float32) is None:
        pytest.skip("no oneDNN in this build of torch")
    monkeypatch.setitem(_onednn._COMPUTE, torch.bfloat16, torch.float32)
    monkeypatch.setitem(_onednn._COMPUTE, torch.float16, torch.float32)


def _args(n, c, k, h, w, fmt, dtype, residual, kernel=3, stride=1, padding=1, groups=1):
    g = torch.Generator().manual_seed(n * 131 + c * 7 + h + kernel)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(k, c // groups, kernel, kernel, generator=g) / (c * kernel * kernel) ** 0.5).to(dtype)
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    out = torch.nn.functional.conv2d(x, weight, None, stride, padding, 1, groups)
    r = torch.randn(out.shape, generator=g).to(dtype).contiguous(memory_format=fmt) if residual else None
    return x, weight, scale, shift, r


CASES = {  # (n, c, k, h, w, x format, kernel, stride, padding, groups)
    "3x3-cl": (1, 64, 64, 4, 4, CL, 3, 1, 1, 1),
    "3x3-nchw": (1, 64, 64, 4, 4, NCHW, 3, 1, 1, 1),
    "3x3-s2-odd": (1, 16, 24, 7, 9, CL, 3, 2, 1, 1),
    "1x1-one-pixel": (2, 32, 48, 1, 1, NCHW, 1, 1, 0, 1),
    "stem-c3": (1, 3, 16, 9, 7, CL, 7, 2, 3, 1),
    "grouped": (1, 32, 32, 5, 5, CL, 3, 1, 1, 4),
}


@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_with_conv2d_strides(no_native_16bit, case, residual, act):
    n, c, k, h, w, fmt, kernel, s, p, groups = CASES[case]
    dtype = torch.bfloat16
    x, weight, scale, shift, r = _args(n, c, k, h, w, fmt, dtype, residual, kernel, s, p, groups)
    args = (x, weight, scale, shift, r, (s, s), (p, p), (1, 1), groups, act)
    assert backends.select("conv_bn_act", "conv_bn_act", "torch", args).name == "conv16"
    with torch.inference_mode():
        out = ops.conv_bn_act(x, weight, scale, shift, r, stride=(s, s), padding=(p, p), groups=groups,
                              activation=act, backend="torch")
        expected = reference.conv_bn_act(x, weight, scale, shift, r, (s, s), (p, p), (1, 1), groups, act)
    # the conv output is rounded to the dtype once before the epilogue: two roundings of the output's size
    tol = 2 * 2 ** -8
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * 4)
    assert out.dtype == dtype
    assert out.stride() == torch.nn.functional.conv2d(x, weight, None, s, p, 1, groups).stride()


def test_nan_propagates_through_relu(no_native_16bit):
    x, weight, scale, shift, _ = _args(1, 16, 8, 4, 4, CL, torch.bfloat16, False)
    x[0, :, 0, 0] = float("nan")
    with torch.inference_mode():
        out = ops.conv_bn_act(x, weight, scale, shift, None, padding=1, activation="relu", backend="torch")
    assert out[0, :, :2, :2].isnan().all() and not out[0, :, 3, 3].isnan().any()


@pytest.mark.parametrize("case,reason", [
    (dict(dtype=torch.float32), "bf16"),
    (dict(dtype=torch.float16), "bf16"),
    (dict(native=True), "natively"),
    (dict(shape=(1, 64, 64, 28, 28)), "multiply-adds"),
    (dict(grad=True), "gradient"),
], ids=["fp32", "fp16", "native-bf16", "much-work", "grad"])
def test_refusals_name_the_reason(no_native_16bit, monkeypatch, case, reason):
    monkeypatch.setitem(_onednn._COMPUTE, torch.bfloat16, torch.bfloat16 if case.get("native") else torch.float32)
    n, c, k, h, w = case.get("shape", (1, 16, 16, 4, 4))
    x, weight, scale, shift, r = _args(n, c, k, h, w, CL, case.get("dtype", torch.bfloat16), False)
    x.requires_grad_(case.get("grad", False))
    why = _cpu_conv16.unsupported_reason(x, weight, scale, shift, r, (1, 1), (1, 1), (1, 1), 1, "relu")
    assert why is not None and reason in why


@pytest.mark.parametrize("fmt", [CL, NCHW], ids=["cl", "nchw"])
def test_model_after_other_sizes_matches_torchvision(no_native_16bit, fmt):
    """A bf16 model run on a small input (this path) then a larger one (oneDNN in fp32), then the
    small one again, is as close to torchvision fp32 as torchvision's own bf16 model every time."""
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=10).eval()
    with torch.no_grad():
        for m in base.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    model = fastres.convert(torchvision.models.resnet18(num_classes=10).eval(), warn=False)
    model.load_state_dict(base.state_dict())
    model = model.to(torch.bfloat16).to(memory_format=fmt)
    low = torchvision.models.resnet18(num_classes=10).eval()
    low.load_state_dict(base.state_dict())
    low = low.to(torch.bfloat16).to(memory_format=fmt)
    small, large = (torch.randn(1, 3, s, s).contiguous(memory_format=fmt) for s in (16, 64))
    with torch.no_grad():
        for x in (small, large, small):
            ref = base(x)
            err = (model(x.bfloat16()).float() - ref).norm() / ref.norm()
            err_tv = (low(x.bfloat16()).float() - ref).norm() / ref.norm()
            assert err <= 1.5 * err_tv + 1e-3, (err, err_tv)
    kinds = {kind for u in fastres.nn.modules.fused_modules(model) for (_, kind) in u._fastres_cache._entries}
    assert {"conv16", "onednn"} <= kinds


def test_module_follows_layout_changes(no_native_16bit):
    """A bf16 module on this path fed channels_last, then NCHW, then channels_last again returns F.conv2d's
    output format each time (the prepared weight is remade for the other output format)."""
    from fastres.nn import ConvBNAct
    from test_nn import randomize_bn

    m = randomize_bn(ConvBNAct(16, 24, 3)).eval().to(torch.bfloat16)
    x = torch.randn(1, 16, 6, 6).to(torch.bfloat16)
    with torch.inference_mode():
        for fmt in (CL, NCHW, CL):
            xi = x.contiguous(memory_format=fmt)
            expected = torch.relu(m.bn(m.conv(xi)))
            out = m(xi)
            assert out.stride() == expected.stride()
            torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2)
    assert "conv16" in {kind for (_, kind) in m._fastres_cache._entries}
