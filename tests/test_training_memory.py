"""Training in less activation memory, with unchanged gradients (fastres/nn/_train.py).

* the fused ``bn_act`` backward's recomputed output (``output=True``) on every
  backend against the reference, and the reference against autograd;
* the training units' autograd functions: gradcheck in fp64;
* whole ResNets in float64: gradients and running statistics equal
  torchvision's to 1e-9 relative, in both ``training_memory`` modes;
* the bytes saved for backward (a count, ``benchmarks.saved``) against torchvision's;
* torch.utils.checkpoint and timm's gradient checkpointing on converted models.
"""
import contextlib
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fastres
from benchmarks.saved import saved_bytes
from fastres import _cpu_bn, ops, reference
from fastres.nn import _train
from conftest import ACTIVATIONS, DEVICE, DTYPES, FORMATS, TOL, all_backends, kernel_backends


def _x(shape, dtype, fmt="nchw"):
    return (torch.randn(shape, device=DEVICE) * 2).to(dtype).contiguous(memory_format=FORMATS[fmt])


# ----------------------------------------------------------------------------
# The fused bn_act backward with the recomputed output.
# ----------------------------------------------------------------------------


def test_reference_backward_is_autograd():
    """reference.bn_act_backward is autograd through reference.bn_act (fp64)."""
    for act in ACTIVATIONS:
        for with_residual in (False, True):
            x, g = (torch.randn(2, 3, 4, 5, dtype=torch.float64) for _ in range(2))
            r = torch.randn_like(x) if with_residual else None
            scale, shift = torch.rand(3, dtype=torch.float64) + 0.5, torch.randn(3, dtype=torch.float64)
            leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, scale, shift, r)]
            y = reference.bn_act(*leaves, act)
            y.backward(g)
            gx, gz, gs, gb, out = reference.bn_act_backward(g, x, scale, shift, r, act, with_residual, True)
            torch.testing.assert_close(out, y.detach(), rtol=0, atol=0)
            for got, leaf in zip((gx, gs, gb), leaves):
                torch.testing.assert_close(got, leaf.grad, rtol=1e-12, atol=1e-12)
            if with_residual:
                torch.testing.assert_close(gz, leaves[3].grad, rtol=1e-12, atol=1e-12)
            else:
                assert gz.numel() == 0


@pytest.mark.parametrize("backend", all_backends("bn_act"))  # "torch": fastres._cpu_bn on the CPU
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (3, 16, 3, 3)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_bn_act_backward_output(backend, shape, fmt, dtype, act, with_residual):
    """(grad_x, grad_z, grad_scale, grad_shift, y) of a backend == the reference's."""
    x, g = _x(shape, dtype, fmt), _x(shape, dtype, fmt)
    r = _x(shape, dtype, fmt) if with_residual else None
    scale = torch.rand(shape[1], device=DEVICE) + 0.5
    shift = torch.randn(shape[1], device=DEVICE)
    got = ops.bn_act_backward(g, x, scale, shift, r, act, with_residual, True, backend=backend)
    want = reference.bn_act_backward(g, x, scale, shift, r, act, with_residual, True)
    for name, a, b in zip(["grad_x", "grad_z", "grad_scale", "grad_shift", "y"], got, want):
        tol = dict(rtol=1e-4, atol=1e-4) if name in ("grad_scale", "grad_shift") else TOL[dtype]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{name}: {m}")
    y = got[4]
    assert y.stride() == got[0].stride()  # output like dense(x), as every other output
    torch.testing.assert_close(y, ops.bn_act(x, scale, shift, r, act, backend=backend), **TOL[dtype])
    # without output=True, y is empty and the rest is unchanged
    plain = ops.bn_act_backward(g, x, scale, shift, r, act, with_residual, backend=backend)
    assert plain[4].numel() == 0
    for a, b in zip(plain[:4], got[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_bn_act_torch_backend_fp64(fmt, act, with_residual):
    """fp64 with fp64 scale/shift (fp64 training) on the "torch" backend: the reference's to fp64 rounding."""
    x, g = _x((2, 5, 7, 9), torch.float64, fmt), _x((2, 5, 7, 9), torch.float64, fmt)
    r = _x((2, 5, 7, 9), torch.float64, fmt) if with_residual else None
    scale = torch.rand(5, device=DEVICE, dtype=torch.float64) + 0.5
    shift = torch.randn(5, device=DEVICE, dtype=torch.float64)
    torch.testing.assert_close(ops.bn_act(x, scale, shift, r, act, backend="torch"),
                               reference.bn_act(x, scale, shift, r, act), **TOL[torch.float64])
    got = ops.bn_act_backward(g, x, scale, shift, r, act, with_residual, True, backend="torch")
    want = reference.bn_act_backward(g, x, scale, shift, r, act, with_residual, True)
    for name, a, b in zip(["grad_x", "grad_z", "grad_scale", "grad_shift", "y"], got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a, b, **TOL[torch.float64], msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_backward_with_output(backend, fmt):
    bwd = getattr(torch.ops.fastres, f"bn_act_backward_{backend}")
    x, g, r = (_x((2, 3, 4, 5), torch.float32, fmt) for _ in range(3))
    scale, shift = torch.rand(3, device=DEVICE) + 0.5, torch.randn(3, device=DEVICE)
    torch.library.opcheck(bwd, (g, x, scale, shift, None, "relu", False, True))
    torch.library.opcheck(bwd, (g, x, scale, shift, r, "silu", True, True))


def test_bn_act_backward_checks_grad():
    x = torch.randn(2, 3, 4, 5)
    with pytest.raises(ValueError, match="`grad`"):
        ops.bn_act_backward(torch.randn(2, 3, 4), x, torch.ones(3), torch.zeros(3), None, "relu", False)


# ----------------------------------------------------------------------------
# The training units' autograd functions.
# ----------------------------------------------------------------------------


def _leaf(*shape):
    return torch.randn(*shape, dtype=torch.float64, requires_grad=True)


@pytest.fixture(params=["fastres-cpu", "aten"])
def cpu_kernels(request, monkeypatch):
    """The CPU kernels of the "torch" backend's training units: fastres's (csrc/cpu/), or ATen's
    BatchNorm kernels, as without them."""
    if request.param == "aten":
        monkeypatch.setattr(_cpu_bn, "NATIVE", False)
    elif not _cpu_bn.NATIVE:
        pytest.skip("fastres._C's CPU kernels are not loaded")
    return request.param


def _only_torch_sees(backend, cpu_kernels):
    if backend != "torch" and cpu_kernels != "fastres-cpu":
        pytest.skip("the CPU kernels serve the torch backend only")


def _state(y, weight, bias, act, backend):
    """The batch statistics a training unit computes for ``y`` (no gradient, no running stats),
    with the kernels it would choose for them."""
    var, mean = _train._batch_stats(y.detach(), nn.BatchNorm2d(y.shape[1], track_running_stats=False), 0)
    return _train._state(mean, torch.rsqrt(var + 1e-5), weight, bias, 1e-5, act,
                         _train._kernels(y, None, act, backend))


def _away_from_relu_kink(y, bias):
    """``y`` and the BN ``bias`` moved so that no normalized value is near 0 (finite
    differences across ReLU's kink are meaningless)."""
    with torch.no_grad():
        y.copy_(y.sign() * (y.abs() + 0.1))
        y.sub_(y.mean(dim=(0, 2, 3), keepdim=True))
        bias.zero_()


def _stats_bn(c):
    return nn.BatchNorm2d(c, track_running_stats=False).double()


@pytest.mark.parametrize("backend", all_backends("bn_act"))
@pytest.mark.parametrize("act_prev", ACTIVATIONS)
def test_gradcheck_conv_batch_stats(backend, act_prev, cpu_kernels):
    """y = conv(act(bn(src))) with bn's batch statistics of src (and y = conv(src)), with a conv
    bias: the gradients of src, the BN weight and bias, the conv weight and bias; the unit's own
    activation and statistics carry none."""
    _only_torch_sees(backend, cpu_kernels)
    src, w, b = _leaf(2, 3, 4, 5), _leaf(4, 3, 3, 3), _leaf(4)
    bn_w, bn_b = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), _leaf(3)
    if act_prev == "relu":
        _away_from_relu_kink(src, bn_b)
    conv_args = ((1, 1), (1, 1), (1, 1), 1)

    def unit(s, bw, bb, w_, b_, prev):
        return _train._ConvBNActDeferred.apply(s, bw, bb, w_, b_, None, None, None, prev, conv_args, "relu", backend,
                                            None, _stats_bn(4), 40)

    def f(s, bw, bb, w_, b_):
        y, a, state = unit(s, bw, bb, w_, b_, _state(s, bw, bb, act_prev, backend))
        assert not a.requires_grad and not any(t.requires_grad for t in state[:4])
        return y

    assert torch.autograd.gradcheck(f, (src, bn_w, bn_b, w, b))
    plain = lambda s, w_, b_: unit(s, None, None, w_, b_, None)[0]  # noqa: E731
    assert torch.autograd.gradcheck(plain, (src, w, b))


@pytest.mark.parametrize("backend", all_backends("bn_act"))
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_gradcheck_bn_act_batch_stats(backend, act, with_residual, cpu_kernels):
    """act(bn(y) (+ residual)) with bn's batch statistics of y: nn.BatchNorm2d's backward."""
    _only_torch_sees(backend, cpu_kernels)
    y, r = _leaf(3, 4, 3, 5), _leaf(3, 4, 3, 5) if with_residual else None
    bn_w, bn_b = (torch.rand(4, dtype=torch.float64) + 0.5).requires_grad_(), _leaf(4)
    if act == "relu" and not with_residual:
        _away_from_relu_kink(y, bn_b)

    def f(y_, bw, bb, *res):
        return _train._BNAct.apply(y_, bw, bb, res[0] if res else None, _state(y_, bw, bb, act, backend), backend, None)

    torch.manual_seed(0)
    assert torch.autograd.gradcheck(f, (y, bn_w, bn_b, *([r] if with_residual else [])), atol=1e-6)
    assert torch.autograd.gradcheck(
        lambda y_: _train._BNAct.apply(y_, None, None, None, _state(y_, None, None, act, backend), backend, None), (y,),
        atol=1e-6)


@pytest.mark.parametrize("backend", all_backends("bn_act"))
@pytest.mark.parametrize("pool", [(3, 2, 1, False), (2, 2, 0, True)], ids=["k3s2p1", "k2s2-ceil"])
def test_gradcheck_bn_relu_max_pool(backend, pool, cpu_kernels):
    """max_pool2d(relu(bn(y))) of a pending BN, the ReLU's backward on the pooled output: the
    gradients of y and the BN's weight and bias; the output is max_pool2d's."""
    _only_torch_sees(backend, cpu_kernels)
    k, st, p, ceil = pool
    y = _leaf(2, 3, 7, 9)
    bn_w, bn_b = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), _leaf(3)
    _away_from_relu_kink(y, bn_b)
    args = ((k, k), (st, st), (p, p), (1, 1), ceil)

    def f(y_, bw, bb):
        return _train._BNReLUMaxPool.apply(y_, bw, bb, None, _state(y_, bw, bb, "relu", backend), backend, *args)

    state = _state(y, bn_w, bn_b, "relu", backend)
    expected = F.max_pool2d(torch.relu(y * state.scale.view(1, -1, 1, 1) + state.shift.view(1, -1, 1, 1)),
                            k, st, p, ceil_mode=ceil)
    torch.testing.assert_close(f(y, bn_w, bn_b), expected)
    assert torch.autograd.gradcheck(f, (y, bn_w, bn_b), atol=1e-6)


@pytest.mark.parametrize("backend", all_backends("bn_act"))
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("keep_y", [True, False], ids=["low", "min"])
def test_gradcheck_conv_bn_act(backend, act, keep_y, cpu_kernels):
    """A block's last unit, act(bn(conv(silu(bn(src)))) + residual), BN affine, keeping its conv
    output or (training_memory="min") recomputing it."""
    _only_torch_sees(backend, cpu_kernels)
    src, w, r = _leaf(3, 2, 4, 4), _leaf(3, 2, 1, 1), _leaf(3, 3, 4, 4)
    bn_wp, bn_bp = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_(), _leaf(2)
    bn_w, bn_b = (torch.rand(3, dtype=torch.float64) + 0.5).requires_grad_(), _leaf(3)
    conv_args = ((1, 1), (0, 0), (1, 1), 1)

    def f(s, bwp, bbp, w_, bw, bb, res):
        prev = None if bwp is None else _state(s, bwp, bbp, "silu", backend)
        bn = _stats_bn(3)
        bn.weight, bn.bias = None, None  # eps from the module; the parameters are the function's inputs
        return _train._ConvBNAct.apply(s, bwp, bbp, w_, None, bw, bb, res, None, prev, conv_args, act,
                                       backend, None, bn, 48, keep_y)

    # relu: kinks are measure-zero but finite differences may cross one; check in a smooth point
    torch.manual_seed(0)
    assert torch.autograd.gradcheck(f, (src, bn_wp, bn_bp, w, bn_w, bn_b, r), atol=1e-6)
    assert torch.autograd.gradcheck(lambda s, w_: f(s, None, None, w_, None, None, None), (src, w), atol=1e-6)


# ----------------------------------------------------------------------------
# Whole models against torchvision in float64.
# ----------------------------------------------------------------------------


def _pair(arch, mode, fmt, **kwargs):
    torch.manual_seed(0)
    tv = torchvision.models.get_model(arch, num_classes=10, **kwargs).double().train()
    if not kwargs.get("zero_init_residual"):
        with torch.no_grad():
            for m in tv.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0, 0.3)
    fr = fastres.set_training_memory(fastres.convert(copy.deepcopy(tv), warn=False), mode)
    return fr.to(memory_format=FORMATS[fmt]), tv.to(memory_format=FORMATS[fmt])


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


@pytest.mark.parametrize(
    "arch, mode, fmt, kwargs",
    [
        ("resnet18", "low", "nchw", {}),
        ("resnet18", "min", "nhwc", {}),
        ("resnet50", "low", "nhwc", {}),
        ("resnet50", "min", "nchw", {}),
        ("resnet50", "min", "nhwc", {"zero_init_residual": True}),
    ],
    ids=str,
)
def test_float64_gradients_and_running_stats_equal_torchvision(arch, mode, fmt, kwargs, cpu_kernels):
    fr, tv = _pair(arch, mode, fmt, **kwargs)
    for step in range(2):
        x = torch.randn(2, 3, 40, 40, dtype=torch.float64).contiguous(memory_format=FORMATS[fmt])
        out, expected = fr(x), tv(x)
        assert _rel(out, expected) < 1e-9
        g = torch.randn_like(expected)
        out.backward(g), expected.backward(g)
        for (name, p), q in zip(tv.named_parameters(), fr.parameters()):
            assert _rel(q.grad, p.grad) < 1e-9, (step, name)
        for (name, b), c in zip(tv.named_buffers(), fr.buffers()):
            assert _rel(c.double(), b.double()) < 1e-9 if b.is_floating_point() else torch.equal(b, c), name


def test_set_training_memory_checks_mode():
    fr = fastres.models.resnet18()
    assert fastres.set_training_memory(fr, "min") is fr
    assert all(m.training_memory == "min" for m in fastres.nn.modules.fused_modules(fr))
    assert "training_memory='min'" in repr(fr.layer1[0])
    with pytest.raises(ValueError, match="`mode`"):
        fastres.set_training_memory(fr, "max")


# ----------------------------------------------------------------------------
# Saved bytes: a count, not a timing.
# ----------------------------------------------------------------------------


def _activation_bytes(model, x):
    """Bytes saved for backward by one training forward, the parameters left out
    (both implementations keep them alike, and they do not scale with the batch)."""
    return saved_bytes(model, x, exclude=list(model.parameters()))[0]


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_saved_bytes_against_torchvision(arch, fmt, dtype):
    """fp32, and bf16 as it trains (autocast: the bf16 copies of the weights that autograd
    through F.conv2d keeps count too; fastres makes them again in the backward)."""
    torch.manual_seed(0)
    tv = torchvision.models.get_model(arch).train().to(memory_format=FORMATS[fmt])
    x = torch.randn(2, 3, 96, 96).contiguous(memory_format=FORMATS[fmt])
    fr = fastres.convert(copy.deepcopy(tv), warn=False).train()
    with torch.autocast("cpu", torch.bfloat16, enabled=dtype == torch.bfloat16):
        base = _activation_bytes(tv, x)
        low = _activation_bytes(fr, x)
        low_min = _activation_bytes(fastres.set_training_memory(fr, "min"), x)
    print(arch, fmt, dtype, low / base, low_min / base)
    assert low <= 0.9 * base
    assert low_min <= 0.55 * base


@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
@pytest.mark.parametrize("mode, bound", [("low", 0.8), ("min", 0.55)])
def test_saved_bytes_kernel_backend(backend, mode, bound):
    """The kernel backends' bn_act op keeps its input, never its output."""
    torch.manual_seed(0)
    tv = torchvision.models.get_model("resnet18").train().to(DEVICE)
    x = torch.randn(2, 3, 64, 64, device=DEVICE)
    fr = fastres.set_training_memory(fastres.convert(copy.deepcopy(tv), backend=backend, warn=False), mode)
    assert _activation_bytes(fr, x) <= bound * _activation_bytes(tv, x)


# ----------------------------------------------------------------------------
# Checkpointing.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["low", "min"])
def test_torch_utils_checkpoint(mode):
    """Checkpointed blocks (recomputed in backward: BN statistics update twice, as torchvision's)."""
    from torch.utils.checkpoint import checkpoint

    fr, tv = _pair("resnet18", mode, "nchw")
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)

    def run(model):
        h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
        for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
            h = checkpoint(layer, h, use_reentrant=False)
        return model.fc(torch.flatten(model.avgpool(h), 1))

    out, expected = run(fr), run(tv)
    assert _rel(out, expected) < 1e-9
    out.sum().backward(), expected.sum().backward()
    for (name, p), q in zip(tv.named_parameters(), fr.parameters()):
        assert _rel(q.grad, p.grad) < 1e-9, name
    for (name, b), c in zip(tv.named_buffers(), fr.buffers()):
        assert _rel(c.double(), b.double()) < 1e-9 if b.is_floating_point() else torch.equal(b, c), name


@pytest.mark.parametrize("mode", ["low", "min"])
def test_timm_gradient_checkpointing(mode):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("resnet18", num_classes=10).double().train()
    fr = fastres.set_training_memory(fastres.convert(copy.deepcopy(ref), warn=False), mode)
    assert isinstance(fr.layer1[0], fastres.nn.TimmBasicBlock)
    ref.set_grad_checkpointing(True), fr.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    out, expected = fr(x), ref(x)
    assert _rel(out, expected) < 1e-9
    out.sum().backward(), expected.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fr.parameters()):
        assert _rel(q.grad, p.grad) < 1e-9, name


@pytest.mark.parametrize("mode", ["low", "min"])
def test_torch_compile_train(mode):
    """fullgraph (no graph break) through the training units; gradients and running stats as eager."""
    torch._dynamo.reset()
    fr, _ = _pair("resnet18", mode, "nhwc")
    fr = fr.float()
    ref = copy.deepcopy(fr)
    compiled = torch.compile(fr, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    out, expected = compiled(x), ref(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward(), expected.sum().backward()
    for (name, p), q in zip(ref.named_parameters(), fr.parameters()):
        assert _rel(q.grad, p.grad) < 1e-4, name
    # Eager takes the statistics from BatchNorm's kernel, the compiled graph from torch.var_mean:
    # two fp32 reduction orders (BatchNorm's CPU kernel is good to ~1e-6 relative, as torchvision's).
    for (name, b), c in zip(ref.named_buffers(), fr.buffers()):
        assert _rel(c.double(), b.double()) < 1e-5 if b.is_floating_point() else torch.equal(b, c), name


@pytest.mark.parametrize("mode", ["low", "min"])
def test_deferred_unit_meets_frozen_bn_and_hooks(mode):
    """A unit's pending BN-act is applied as a tensor when the next unit does not run
    the training path: a frozen (eval) BN, or a conv with a hook."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet.Bottleneck(16, 4).double().train()
    fr = fastres.set_training_memory(fastres.convert(copy.deepcopy(tv), warn=False), mode)
    for m in (tv, fr):
        m.bn2.eval()
    fr.conv3.register_forward_hook(lambda *a: None)
    x = torch.randn(2, 16, 6, 6, dtype=torch.float64)
    out, expected = fr(x), tv(x)
    assert _rel(out, expected) < 1e-9
    out.sum().backward(), expected.sum().backward()
    for (name, p), q in zip(tv.named_parameters(), fr.parameters()):
        assert _rel(q.grad, p.grad) < 1e-9, name
    for (name, b), c in zip(tv.named_buffers(), fr.buffers()):
        assert _rel(c.double(), b.double()) < 1e-9 if b.is_floating_point() else torch.equal(b, c), name


def test_stem_without_pooling_materializes_its_carried_activation(monkeypatch):
    """A ResNet whose maxpool is replaced (nn.Identity, as for small images) trains as
    torchvision's; the stem's pending BN becomes a tensor from the activation it carries, not
    a second BN-activation pass."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).double().train()
    tv.maxpool = nn.Identity()
    fr = fastres.convert(copy.deepcopy(tv), warn=False)
    assert isinstance(fr.maxpool, nn.Identity)
    passes = []
    bn_act = _train._bn_act
    monkeypatch.setattr(_train, "_bn_act", lambda *args: passes.append(1) or bn_act(*args))
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    out, expected = fr(x), tv(x)
    assert len(passes) == sum(isinstance(m, nn.Conv2d) for m in fr.modules())  # one per unit
    assert _rel(out, expected) < 1e-9
    out.square().sum().backward()
    expected.square().sum().backward()
    for (name, p), q in zip(fr.named_parameters(), tv.parameters()):
        assert _rel(p.grad, q.grad) < 1e-9, name


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_train_forward_in_every_grad_mode_matches_torchvision(mode):
    """A training-mode forward (the stem's pending BN into the pooling included) gives torchvision's
    output and running statistics with autograd on, under no_grad (BN recalibration, as
    torch.optim.swa_utils.update_bn runs it) and under inference_mode."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18(num_classes=10).double().train()
    fr = fastres.convert(copy.deepcopy(tv), warn=False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    ctx = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        out, expected = fr(x), tv(x)
    assert out.requires_grad == (mode == "grad")
    assert _rel(out, expected) < 1e-9
    for (name, b), c in zip(fr.named_buffers(), tv.buffers()):
        assert torch.allclose(b, c, rtol=1e-9, atol=1e-12), name
