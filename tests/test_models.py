"""fastres.models against torchvision.models (fp32 CPU, torch backend unless stated).

Random weights with non-trivial BN statistics; eval outputs of every model,
one training step (loss, every gradient, BN running statistics), state_dict
compatibility both ways, pretrained weights (a monkeypatched enum, never a
download), transfer-learning helpers, torch.compile / torch.export / CUDA
graphs, save and load.
"""
import copy
import io

import pytest
import torch
from torch import nn

import fastres
import fastres.models as fm
from fastres import _cpu_bn, ops

torchvision = pytest.importorskip("torchvision")
import torchvision.models as tvm  # noqa: E402

from conftest import FORMATS  # noqa: E402
from test_nn import assert_as_accurate, assert_close, randomize_bn  # noqa: E402

torch.manual_seed(0)


def make_pair(name, seed=0, **kwargs):
    """(fastres model, torchvision model) with the same random weights, both in eval mode."""
    torch.manual_seed(seed)
    tv = randomize_bn(getattr(tvm, name)(**kwargs), seed)
    fr = getattr(fm, name)(**kwargs)
    fr.load_state_dict(tv.state_dict(), strict=True)
    return fr.eval(), tv.eval()


# (model, input shape): small inputs; the deepest at 32x32.
EVAL_CASES = [
    ("resnet18", (1, 3, 64, 64)),
    ("resnet18", (2, 3, 97, 131)),
    ("resnet34", (1, 3, 64, 64)),
    ("resnet50", (1, 3, 64, 64)),
    ("resnet50", (2, 3, 97, 131)),
    ("resnet101", (1, 3, 32, 32)),
    ("resnet152", (1, 3, 32, 32)),
    ("resnext50_32x4d", (1, 3, 64, 64)),
    ("resnext101_32x8d", (1, 3, 32, 32)),
    ("resnext101_64x4d", (1, 3, 32, 32)),
    ("wide_resnet50_2", (1, 3, 64, 64)),
    ("wide_resnet101_2", (1, 3, 32, 32)),
]


@pytest.mark.parametrize("name, shape", EVAL_CASES, ids=[f"{n}-{'x'.join(map(str, s))}" for n, s in EVAL_CASES])
def test_eval_matches_torchvision(name, shape):
    fr, tv = make_pair(name)
    x = torch.randn(shape)
    with torch.no_grad():
        out, expected = fr(x), tv(x)
    assert out.shape == (shape[0], 1000) and out.is_contiguous()
    assert_close(out, expected, 1e-4, name)


@pytest.mark.parametrize("kwargs", [
    dict(replace_stride_with_dilation=[False, True, True]),
    dict(num_classes=7, zero_init_residual=True),
    dict(norm_layer=lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=None)),
    dict(norm_layer=lambda c: nn.GroupNorm(4, c)),  # not fusable: runs as the modules
], ids=["dilation", "classes-zero-init", "bn-eps", "groupnorm"])
def test_constructor_arguments(kwargs):
    fr, tv = make_pair("resnet50", **kwargs)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert_close(fr(x), tv(x), 1e-4)


def test_activation_argument():
    m = fm.resnet18(activation="silu").eval()
    assert type(m.relu) is nn.SiLU and type(m.layer1[0].relu) is nn.SiLU
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


# ResNet-50 with fastres's CPU kernels is left to tests/test_training_memory.py (fp64, to 1e-9):
# at this size one ReLU of layer4.1 is within 1.4e-4 of 0 and goes the other way in fp32 when
# the batch statistics round otherwise than torchvision's, which moves a whole channel's gradient.
@pytest.mark.parametrize("name, kernels, fmt, mode", [
    ("resnet18", "fastres-cpu", "nchw", "low"), ("resnet18", "aten", "nchw", "low"), ("resnet50", "aten", "nchw", "low"),
    ("resnet18", "fastres-cpu", "nhwc", "low"), ("resnet18", "fastres-cpu", "nhwc", "min"),
    ("resnet18", "fastres-cpu", "nchw", "min"),
])
def test_train_step_matches_torchvision(name, kernels, fmt, mode, monkeypatch):
    """One training step: the loss, every gradient, every BN buffer, with fastres's CPU kernels
    or ATen's BatchNorm kernels (as without them), NCHW and channels_last (the convs through
    oneDNN's op), in both memory modes (``"min"``: the kernels over the tensors the units no
    longer need).

    Batch statistics over few values (layer4 sees 2x2x2 per channel here) make
    the gradients ill-conditioned: torchvision's own fp32 gradients differ from
    fp64 ones by ~1e-4 relative, and on some CPUs (an AMD EPYC with AVX2) by 19%
    in ResNet-50's layer4.1, where one of its ReLUs at ~0 goes the other way. So
    the gradients are compared with torchvision's fp32 ones, or, where those are
    off, with the fp64 ones; and their error against fp64 must be of the same
    order as torchvision's fp32 error (no extra fp32 cancellation).
    """
    if kernels == "aten":
        monkeypatch.setattr(_cpu_bn, "NATIVE", False)
    elif not _cpu_bn.NATIVE:
        pytest.skip("fastres._C's CPU kernels are not loaded")
    fr, tv = make_pair(name, num_classes=10)
    fastres.set_training_memory(fr, mode)
    if fmt == "nhwc":
        fr, tv = fr.to(memory_format=torch.channels_last), tv.to(memory_format=torch.channels_last)
    tv64 = copy.deepcopy(tv).double()
    x, target = torch.randn(2, 3, 64, 64).contiguous(memory_format=FORMATS[fmt]), torch.tensor([1, 7])
    losses = []
    for model in (fr, tv, tv64):
        model.train()
        loss = nn.functional.cross_entropy(model(x.to(next(model.parameters()).dtype)), target)
        loss.backward()
        losses.append(loss)
    assert_close(losses[0], losses[1], 1e-5, "loss")
    tvp, tv64p = dict(tv.named_parameters()), dict(tv64.named_parameters())
    for pname, p in fr.named_parameters():
        exact = tv64p[pname].grad
        try:
            assert_close(p.grad, tvp[pname].grad, 2e-3, f"grad {pname}", atol=1e-6)
        except AssertionError:  # torchvision's fp32 run flipped a ReLU at ~0 (on some CPUs): it is the one off
            assert_close(p.grad, exact.float(), 2e-3, f"grad {pname} against fp64", atol=1e-6)
        assert_as_accurate(p.grad, tvp[pname].grad, exact, f"grad {pname}")
    tvb, tv64b = dict(tv.named_buffers()), dict(tv64.named_buffers())
    for bname, b in fr.named_buffers():
        exact = tv64b[bname].double()
        assert_close(b.double(), tvb[bname].double(), 1e-4, bname)
        assert_as_accurate(b, tvb[bname], exact, bname, rtol=1e-6)


def test_state_dict_both_ways():
    fr, tv = make_pair("resnet50")
    assert list(fr.state_dict()) == list(tv.state_dict())
    assert [n for n, _ in fr.named_modules()] == [n for n, _ in tv.named_modules()]
    torch.manual_seed(3)
    fresh_tv = tvm.resnet50()
    fresh_tv.load_state_dict(fr.state_dict(), strict=True)
    for (k, a), b in zip(fr.state_dict().items(), fresh_tv.state_dict().values()):
        assert torch.equal(a, b), k


def test_channels_last_input_once():
    fr, tv = make_pair("resnet18")
    x = torch.randn(1, 3, 40, 48)
    feats = fr.forward_features(x)
    assert feats.is_contiguous(memory_format=torch.channels_last)
    fr.channels_last = False
    with torch.no_grad():
        assert_close(fr(x), tv(x), 1e-4)


# ----------------------------------------------------------------------------
# Pretrained weights: torchvision's enum, monkeypatched (no download).
# ----------------------------------------------------------------------------


def test_weights_load_torchvision_state_dict(monkeypatch):
    torch.manual_seed(1)
    source = randomize_bn(tvm.resnet18()).eval()
    calls = []

    def get_state_dict(self, *args, **kwargs):
        calls.append((self, kwargs))
        return source.state_dict()

    monkeypatch.setattr(tvm.ResNet18_Weights, "get_state_dict", get_state_dict)
    m = fm.resnet18(weights=tvm.ResNet18_Weights.IMAGENET1K_V1, progress=False).eval()
    assert calls == [(tvm.ResNet18_Weights.IMAGENET1K_V1, dict(progress=False, check_hash=True))]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert_close(m(x), source(x), 1e-4)
    fm.resnet18(weights="DEFAULT")  # names work as in torchvision
    assert len(calls) == 2
    with pytest.raises(ValueError, match="num_classes"):
        fm.resnet18(weights="DEFAULT", num_classes=10)
    with pytest.raises(TypeError, match="ResNet18_Weights"):
        fm.resnet18(weights=tvm.ResNet50_Weights.DEFAULT)


# ----------------------------------------------------------------------------
# Transfer learning.
# ----------------------------------------------------------------------------


def test_forward_features_and_reset_classifier():
    fr, tv = make_pair("resnet50")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = fr.forward_features(x)
        assert feats.shape == (2, 2048, 2, 2) and fr.num_features == 2048
        assert_close(fr.forward_head(feats), tv(x), 1e-4)
        assert fr.forward_head(feats, pre_logits=True).shape == (2, 2048)
    fr.reset_classifier(5)
    assert fr.get_classifier() is fr.fc and fr.fc.out_features == 5 and fr.num_classes == 5
    assert fr(x).shape == (2, 5)
    fr.reset_classifier(0)
    assert fr(x).shape == (2, 2048)


def test_freeze_bn_survives_train_and_trains_affine(monkeypatch):
    fr, tv = make_pair("resnet18", num_classes=3)
    fr.freeze_bn()
    fr.train()
    tv.train()
    for m in tv.modules():  # the reference: torchvision with its BNs in eval mode
        if isinstance(m, nn.BatchNorm2d):
            m.eval()
    bns = [m for m in fr.modules() if isinstance(m, nn.BatchNorm2d)]
    assert fr.training and not any(m.training for m in bns)
    stats = copy.deepcopy([m.running_mean for m in bns])
    calls = {"conv_bn_act": 0}
    orig = ops.run_conv_bn_act

    def counting(*a, **k):
        calls["conv_bn_act"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(ops, "run_conv_bn_act", counting)
    x = torch.randn(2, 3, 32, 32)
    fr(x).logsumexp(1).sum().backward()
    tv(x).logsumexp(1).sum().backward()
    assert calls["conv_bn_act"] == len(bns)  # every conv/BN pair fused, even in training
    tvp = dict(tv.named_parameters())
    for name, p in fr.named_parameters():
        assert_close(p.grad, tvp[name].grad, 1e-4, name, atol=1e-6)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, bns))
    fr.freeze_bn(False)
    assert all(m.training for m in bns)


# ----------------------------------------------------------------------------
# Ecosystem: compile, export, CUDA graphs, save/load, the triton backend.
# ----------------------------------------------------------------------------


def tiny(**kwargs):
    """A ResNet with one block per stage: the whole structure, quick to trace."""
    torch.manual_seed(0)
    return randomize_bn(fm.ResNet(fm.resnet.BasicBlock, [1, 1, 1, 1], num_classes=10, **kwargs))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_torch_compile_fullgraph(train):
    torch._dynamo.reset()
    model = tiny().train(train)
    ref = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    # train: eager takes the batch statistics from BatchNorm's kernel, the compiled graph from
    # torch.var_mean (fp32 roundings apart); at 64x64 layer4 normalizes over 8 values per
    # channel (at 32x32, over 2: gradients then move by 5e-3 with the reduction order alone).
    x = torch.randn(2, 3, 64, 64) if train else torch.randn(2, 3, 32, 32)
    out, expected = compiled(x), ref(x)
    assert_close(out, expected, 1e-5)
    if train:
        out.sum().backward(), expected.sum().backward()
        refp = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert_close(p.grad, refp[name].grad, 1e-4, name, atol=1e-6)
        refb = dict(ref.named_buffers())
        for name, b in model.named_buffers():  # running statistics updated under compile too
            assert_close(b.double(), refb[name].double(), 1e-5, name)
    else:  # edits after compiling are seen: nothing stale was captured
        with torch.no_grad():
            for m in (model, ref):
                m.layer1[0].bn1.running_var.mul_(4)
        assert_close(compiled(x), ref(x), 1e-5)


def test_torch_export_eval():
    model = tiny().eval()
    x = torch.randn(1, 3, 32, 32)
    ep = torch.export.export(model, (x,))
    with torch.no_grad():
        assert_close(ep.module()(x), model(x), 1e-5)
        x2 = torch.randn(1, 3, 32, 32)
        assert_close(ep.module()(x2), model(x2), 1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graph_capture():
    fr, tv = make_pair("resnet18")
    fr, tv = fr.cuda(), tv.cuda()
    static_x = torch.randn(2, 3, 64, 64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.no_grad(), torch.cuda.stream(s):
        for _ in range(3):
            fr(static_x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(g):
        static_out = fr(static_x)
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    g.replay()
    with torch.no_grad():
        expected = tv(x)
    torch.testing.assert_close(static_out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    with torch.no_grad():  # BN edits after capture are seen by the replay (nothing cached in the graph)
        for m in (fr, tv):
            m.layer1[0].bn1.running_var.mul_(4)
        g.replay()
        expected = tv(x)
    torch.testing.assert_close(static_out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


def test_save_load_model_and_state_dict():
    fr, _ = make_pair("resnet18")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = fr(x)
    buf = io.BytesIO()
    torch.save(fr, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert type(loaded) is fm.ResNet
    buf = io.BytesIO()
    torch.save(fr.state_dict(), buf)
    buf.seek(0)
    fresh = fm.resnet18().eval()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)
        assert torch.equal(fresh(x), expected)


def _triton_conv_reason():
    from fastres import backends

    if "triton" not in fastres.backends.implemented_backends("conv_bn_act"):
        return "conv_bn_act has no triton backend in this build yet"
    device = backends.default_device()
    return backends.unavailable_reason("triton", device)


@pytest.mark.skipif(_triton_conv_reason() is not None, reason=str(_triton_conv_reason()))
def test_resnet18_triton_backend():
    """ResNet-18 end to end on the triton backend (on CPU: the Triton interpreter)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fr, tv = make_pair("resnet18")
    fr, tv = fr.to(device), tv.to(device)
    fastres.set_backend(fr, "triton")
    x = torch.randn(1, 3, 32, 32, device=device)
    with torch.no_grad():
        out, expected = fr(x), tv(x)
    rtol = 1e-4 if device == "cpu" else 2e-2  # GPU: TF32 convolutions
    assert_close(out, expected, rtol)
