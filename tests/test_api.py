"""The public contract: argument validation, backend selection, bn_scale_shift,
the torch backend of conv_bn_act, and fastres.info."""
import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fastres
from fastres import backends, ops
from conftest import replace_impl


def _bn_act_args(c=4):
    return torch.randn(2, c, 3, 3), torch.rand(c) + 0.5, torch.randn(c)


@pytest.mark.parametrize("call", [
    lambda: ops.add_act(torch.ones(2, 2), torch.ones(2, 2), "gelu"),
    lambda: ops.bn_act(*_bn_act_args(), activation="tanh"),
    lambda: ops.conv_bn_act(torch.ones(1, 2, 3, 3), torch.ones(2, 2, 1, 1), torch.ones(2), torch.ones(2),
                            activation="Relu"),
])
def test_unknown_activation_lists_valid_names(call):
    with pytest.raises(ValueError, match="'relu', 'silu', 'identity'"):
        call()


def test_unknown_backend_lists_valid_names():
    with pytest.raises(ValueError, match="backend 'mkl'.*'torch', 'triton', 'cuda', 'cudnn'"):
        ops.add_act(torch.ones(2), torch.ones(2), backend="mkl")


def test_known_but_unusable_backend_says_why():
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*"):
        ops.add_act(torch.ones(2), torch.ones(2), backend="cuda")


def test_unimplemented_backend_says_so():
    missing = [b for b in ("triton", "cuda") if b not in backends.implemented_backends("conv_bn_act")]
    if not missing:
        pytest.skip("every backend of conv_bn_act is implemented")
    x, w = torch.ones(1, 2, 3, 3), torch.ones(2, 2, 1, 1)
    with pytest.raises(RuntimeError, match=f"backend '{missing[0]}'"):
        ops.conv_bn_act(x, w, torch.ones(2), torch.ones(2), backend=missing[0])


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    reason = backends.unavailable_reason("triton", torch.device("cpu"))
    assert "TRITON_INTERPRET=1" in reason


def test_default_backend_on_cpu_is_torch():
    assert backends.usable_backends(torch.device("cpu"))[0] == "torch"


@pytest.mark.parametrize("call, match", [
    (lambda: ops.add_act(torch.ones(2, 3), torch.ones(3, 2)), r"`residual` to have the shape of `x`, \(2, 3\)"),
    (lambda: ops.add_act(torch.ones(2), torch.ones(2, dtype=torch.float16)), "`residual` to have the dtype of `x`"),
    (lambda: ops.add_act(torch.ones(2), torch.ones(2, device="meta")), "`residual` on the device of `x`"),
    (lambda: ops.add_act(torch.ones(2, dtype=torch.int32), torch.ones(2, dtype=torch.int32)), "`x` to have dtype float32"),
    (lambda: ops.add_act([1.0], torch.ones(1)), "`x` to be a torch.Tensor"),
    (lambda: ops.bn_act(torch.ones(2, 4, 3), torch.ones(4), torch.ones(4)), r"`x` to be a 4-D \(N, C, H, W\) tensor, got 3-D"),
    (lambda: ops.bn_act(torch.ones(2, 4, 3, 3), torch.ones(3), torch.ones(4)), "`scale` to be a 1-D tensor of length 4"),
    (lambda: ops.bn_act(torch.ones(2, 4, 3, 3), torch.ones(4), torch.ones(4, dtype=torch.float16)), "`shift` to be float32"),
    (lambda: ops.bn_act(torch.ones(2, 4, 3, 3), torch.ones(4), torch.ones(4), torch.ones(2, 4, 3, 2)), "`residual` to have the shape"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 5, 5), torch.ones(8, 3, 3, 3), torch.ones(8), torch.ones(8)), "`weight` of shape"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 5, 5), torch.ones(8, 2, 3, 3), torch.ones(8), torch.ones(8), groups=3), "`weight` of shape"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 5, 5), torch.ones(8, 4, 3, 3), torch.ones(4), torch.ones(8)), "`scale` to be a 1-D tensor of length 8"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 5, 5), torch.ones(8, 4, 3, 3), torch.ones(8), torch.ones(8), stride=0), "stride >= 1"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 5, 5), torch.ones(8, 4, 3, 3), torch.ones(8), torch.ones(8), padding=(1, 2, 3)), "`padding` to be an int or a pair"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 2, 2), torch.ones(8, 4, 3, 3), torch.ones(8), torch.ones(8)), "output would be empty"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 0, 5), torch.ones(8, 4, 1, 1), torch.ones(8), torch.ones(8), padding=1), "non-zero C, H, W"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 5, 5), torch.ones(8, 4, 3, 3), torch.ones(8), torch.ones(8), torch.ones(1, 8, 5, 5)), r"`residual` of the output's shape \(1, 8, 3, 3\)"),
    (lambda: ops.conv_bn_act(torch.ones(1, 4, 5, 5), torch.ones(8, 4, 3, 3, dtype=torch.float64), torch.ones(8), torch.ones(8)), "`weight` to have the dtype of `x`"),
])
def test_bad_input_names_the_argument(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()


def test_bn_scale_shift_matches_eval_batchnorm():
    bn = torch.nn.BatchNorm2d(5, eps=1e-3)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
        bn.weight.normal_()
        bn.bias.normal_()
    bn.eval()
    x = torch.randn(2, 5, 3, 3)
    scale, shift = ops.bn_scale_shift(bn)
    assert scale.dtype == shift.dtype == torch.float32
    torch.testing.assert_close(x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(x))
    (scale.sum() + shift.sum()).backward()
    assert bn.weight.grad is not None and bn.bias.grad is not None


def test_bn_scale_shift_half_module_stays_fp32():
    bn = torch.nn.BatchNorm2d(3).half().eval()
    scale, shift = ops.bn_scale_shift(bn)
    assert scale.dtype == torch.float32


def test_bn_scale_shift_without_running_stats_raises():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        ops.bn_scale_shift(torch.nn.BatchNorm2d(3, track_running_stats=False))


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("conv", [dict(stride=2, padding=3), dict(padding=2, dilation=2), dict(groups=2, padding=1)])
def test_conv_bn_act_torch_backend_matches_modules(fmt, conv):
    groups = conv.get("groups", 1)
    c = torch.nn.Conv2d(4, 6, 3, bias=False, **conv).to(memory_format=fmt)
    bn = torch.nn.BatchNorm2d(6)
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bn.eval()
    x = torch.randn(2, 4, 9, 7).contiguous(memory_format=fmt)
    r = torch.randn_like(c(x))
    scale, shift = ops.bn_scale_shift(bn)
    out = ops.conv_bn_act(x, c.weight, scale, shift, r, stride=c.stride, padding=c.padding,
                          dilation=c.dilation, groups=groups, backend="torch")
    ref = torch.relu(bn(c(x)) + r)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert out.stride() == F.conv2d(x, c.weight, None, c.stride, c.padding, c.dilation, groups).stride()


def test_info_contract():
    d = fastres.info()
    for key in ("version", "torch", "triton", "cuda_ext", "cpu_kernels", "cuda_kernels", "cuda_arch_list", "backends", "device"):
        assert key in d
    assert "torch" in d["backends"]
    assert d["version"] == fastres.__version__


def test_info_cli():
    table = subprocess.run([sys.executable, "-m", "fastres.info"], capture_output=True, text=True, check=True)
    assert "cuda_kernels" in table.stdout
    assert "Warning" not in table.stderr
    out = subprocess.run([sys.executable, "-m", "fastres.info", "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)["version"] == fastres.__version__


CONVS = [dict(stride=2, padding=3), dict(padding=2, dilation=2), dict(groups=2, padding=1), dict(stride=(2, 1))]


def _folded_reference(x, w, scale, shift, r, s, p, d, groups, act):
    """The reference on oneDNN's operands: the weight folded in fp32 and rounded once to the compute dtype."""
    cd = fastres._onednn.compute_dtype(x.dtype)
    wf = (w.float() * scale.view(-1, 1, 1, 1)).to(cd)
    up = None if r is None else r.to(cd)
    out = fastres.reference.conv_bn_act(x.to(cd), wf, torch.ones_like(scale), shift, up, s, p, d, groups, act)
    return out.to(x.dtype)


@pytest.mark.skipif(not fastres._onednn._AVAILABLE, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("conv", CONVS, ids=str)
@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
@pytest.mark.parametrize("x_fmt, r_fmt", [
    (torch.contiguous_format, torch.contiguous_format),
    (torch.channels_last, torch.channels_last),
    (torch.channels_last, torch.contiguous_format),
])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_conv_bn_act_cpu_onednn_path(dtype, conv, act, x_fmt, r_fmt, with_residual, monkeypatch, onednn_16bit):
    """CPU inference through the torch backend takes oneDNN's fused conv (fp32, bf16, fp16) and
    matches the reference: to ~1 ulp on the same (folded, rounded-once) weight, and within the
    rounding of that weight against the unfolded reference."""
    from conftest import TOL

    groups = conv.get("groups", 1)
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 7).to(dtype).contiguous(memory_format=x_fmt)
    w = torch.randn(6, 4 // groups, 3, 3).to(dtype)
    scale, shift = torch.rand(6) + 0.5, torch.randn(6)
    args = dict(stride=conv.get("stride", 1), padding=conv.get("padding", 0),
                dilation=conv.get("dilation", 1), groups=groups, activation=act, backend="torch")
    out_shape = ops.conv_bn_act(x, w, scale, shift, **args).shape
    r = torch.randn(out_shape).to(dtype).contiguous(memory_format=r_fmt) if with_residual else None
    calls = []
    f = fastres._onednn.conv_bn_act
    replace_impl(monkeypatch, "torch", "conv_bn_act", "onednn", fn=lambda *a: calls.append(1) or f(*a))
    with torch.no_grad():
        out = ops.conv_bn_act(x, w, scale, shift, r, **args)
    assert calls or (with_residual and act == "silu"), "the oneDNN path was not taken"
    s, p, d = (fastres._checks.pair("", "", args[k]) for k in ("stride", "padding", "dilation"))
    ref = fastres.reference.conv_bn_act(x, w, scale, shift, r, s, p, d, groups, act)
    assert out.stride() == ref.stride() and out.dtype == dtype
    if calls:  # (fp32: sums of 36 products of O(1), accumulated in oneDNN's order: outputs near 0 get ~1e-6 off)
        tol = dict(TOL[dtype], atol=1e-5) if dtype == torch.float32 else TOL[dtype]
        torch.testing.assert_close(out, _folded_reference(x, w, scale, shift, r, s, p, d, groups, act), **tol)
    # Rounding the folded weight (2^-9 relative in bf16, 2^-12 in fp16) moves each of the 36
    # products of a 3x3x4 conv: about 2^-9 * sqrt(36) * |x||w| in bf16.
    tol = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-3, 8e-3), torch.bfloat16: (3e-2, 6e-2)}[dtype]
    torch.testing.assert_close(out, ref, rtol=tol[0], atol=tol[1])


@pytest.mark.skipif(not fastres._onednn._AVAILABLE, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [1, 2])
def test_conv_bn_act_cpu_onednn_residual_on_one_pixel(dtype, n):
    """A 1x1 output with a residual (ResNet layer4 at 32x32 input; torch 2.11's binary post-op
    fails there with "could not create a memory" for a channels_last 1x1 input) takes the
    unary conv and an fp32 add: any strides of the 1x1 input and residual work."""
    x = torch.randn(n, 16, 1, 1).to(dtype)
    r = torch.randn(n, 32, 1, 1).to(dtype)
    w = torch.randn(32, 16, 1, 1).to(dtype).contiguous(memory_format=torch.channels_last)
    scale, shift = torch.rand(32) + 0.5, torch.randn(32)
    for xs in ((16, 1, 16, 16), (16, 1, 1, 1)):
        for rs in ((32, 1, 32, 32), (32, 1, 1, 1)):
            xx, rr = x.as_strided(x.shape, xs), r.as_strided(r.shape, rs)
            ref = fastres.reference.conv_bn_act(xx, w, scale, shift, rr, (1, 1), (0, 0), (1, 1), 1, "relu")
            for pack in (False, True):
                prep = fastres._onednn.prepare(xx, w, scale, shift, (1, 1), (0, 0), (1, 1), 1, pack=pack)
                out = fastres._onednn.run(prep, xx, rr, "relu")
                torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


def test_conv_bn_act_cpu_onednn_path_not_taken_for_training(monkeypatch):
    replace_impl(monkeypatch, "torch", "conv_bn_act", "onednn", fn=lambda *a: pytest.fail("oneDNN path taken with grad"))
    x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3, requires_grad=True)
    ops.conv_bn_act(x, w, torch.ones(3), torch.zeros(3), backend="torch").sum().backward()
    assert w.grad is not None
    with torch.no_grad():  # fp64: no oneDNN kernel
        ops.conv_bn_act(x.double(), w.double(), torch.ones(3).double(), torch.zeros(3).double(), backend="torch")


@pytest.mark.parametrize("x_shape, w_shape, x_cl, w_cl", [
    ((2, 1, 5, 5), (4, 1, 3, 3), True, False),   # C == 1: both layouts at once, NHWC strides
    ((2, 4, 5, 5), (8, 4, 1, 1), False, True),   # 1x1 weight: both layouts at once, NHWC strides
    ((2, 4, 5, 5), (8, 4, 3, 3), True, False),
    ((2, 4, 5, 5), (8, 4, 3, 3), False, True),
    ((2, 4, 5, 5), (8, 4, 3, 3), False, False),
])
def test_conv_output_memory_format_rule_is_f_conv2d(x_shape, w_shape, x_cl, w_cl):
    """The layout rule every conv_bn_act kernel and the fake kernel use gives F.conv2d's format."""
    cl = torch.channels_last
    x = torch.randn(x_shape).contiguous(memory_format=cl if x_cl else torch.contiguous_format)
    w = torch.randn(w_shape).contiguous(memory_format=cl if w_cl else torch.contiguous_format)
    y = F.conv2d(x, w)
    assert fastres._layout.conv_out_channels_last(x, w) == (not y.is_contiguous())  # y's shape is unambiguous
    fake = fastres._opdefs.conv_bn_act_fake(x, w, torch.ones(w_shape[0]), torch.zeros(w_shape[0]), None, [1, 1], [0, 0], [1, 1], 1, "relu")
    assert fake.stride() == y.stride()
