"""fastres.nn modules against the unfused torch modules they replace (fp32 CPU).

Eval: outputs with non-trivial BN statistics; the scale/shift cache never goes
stale. Train: outputs, every gradient and the running statistics, for every
BatchNorm2d configuration (momentum, momentum=None, track_running_stats=False,
affine=False). What runs fused is checked by counting the fastres.ops calls.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastres
from fastres import _cpu_bn, ops
from fastres.nn import BasicBlock, Bottleneck, ConvBNAct, _train
from conftest import DEVICE, kernel_backends

# fp32 convolutions on a GPU run as TF32 (PyTorch's default for cuDNN, which the
# kernel backends follow): compare with a TF32-sized tolerance there.
KERNEL_RTOL = 1e-5 if DEVICE.type == "cpu" else 5e-3

torchvision = pytest.importorskip("torchvision")
from torchvision.models import resnet as tvr  # noqa: E402


def randomize_bn(model, seed=0):
    """Non-trivial BN affine parameters and running statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5, generator=g)
                    m.bias.normal_(0, 0.5, generator=g)
                if m.running_mean is not None:
                    m.running_mean.normal_(0, 0.5, generator=g)
                    m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def assert_close(actual, expected, rtol=1e-5, what="", atol=1e-12):
    """Max error relative to the largest magnitude of ``expected`` (robust for deep nets).

    ``atol`` for values that are zero in exact arithmetic (the gradient of a conv
    bias followed by a training BN is rounding noise on both sides).
    """
    assert actual.shape == expected.shape, what
    scale = expected.abs().max().item()
    err = (actual.double() - expected.double()).abs().max().item()
    assert err <= rtol * scale + atol, f"{what}: max error {err:.3g} > {rtol} * {scale:.3g} + {atol}"


def assert_as_accurate(actual, reference, exact, what="", factor=4.0, rtol=1e-5):
    """``actual``'s error against ``exact`` (an fp64 run) is at most ``factor`` times
    ``reference``'s (the fp32 torch run) plus ``rtol`` of its scale: for
    ill-conditioned values (deep gradients through batch statistics of few values)
    where fp32 results legitimately differ by more than a tight tolerance."""
    exact = exact.double()
    err, ref_err = ((t.double() - exact).abs().max().item() for t in (actual, reference))
    bound = factor * ref_err + rtol * exact.abs().max().item()
    assert err <= bound, f"{what}: error {err:.3g} vs the reference's {ref_err:.3g}"


class Counter:
    """Counts the calls of functions of ``module`` (monkeypatched wrappers), by the names of
    ``functions`` (name -> attribute); by default fastres.ops's: ``conv_bn_act`` counts
    ``run_conv_bn_act``, the entry of the public function and of fastres.nn's eval units."""

    OPS = {"conv_bn_act": "run_conv_bn_act", "bn_act": "bn_act"}

    def __init__(self, monkeypatch, module=ops, functions=OPS):
        self.calls = dict.fromkeys(functions, 0)
        for name, attr in functions.items():
            orig = getattr(module, attr)

            def wrapper(*args, _orig=orig, _name=name, **kwargs):
                self.calls[_name] += 1
                return _orig(*args, **kwargs)

            monkeypatch.setattr(module, attr, wrapper)


def unit_counter(monkeypatch) -> Counter:
    """Counts the training units' BN passes: ``forward``, each unit's BN with batch statistics
    (``_train._bn_forward``); ``applied``, each BN-activation pass over a tensor
    (``_train._bn_act``: the forward's, and the backward's recomputations)."""
    return Counter(monkeypatch, _train, {"forward": "_bn_forward", "applied": "_bn_act"})


def _unfused(fr: ConvBNAct):
    return nn.Sequential(fr.conv, fr.bn, fr.act)


# ----------------------------------------------------------------------------
# ConvBNAct
# ----------------------------------------------------------------------------

CONV_CASES = [
    dict(in_channels=4, out_channels=6, kernel_size=3),
    dict(in_channels=4, out_channels=8, kernel_size=3, stride=2, groups=2, bias=True),
    dict(in_channels=6, out_channels=6, kernel_size=3, dilation=2),
    dict(in_channels=4, out_channels=5, kernel_size=1, stride=(2, 1), padding=0),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "-".join(f"{k[:3]}{v}" for k, v in c.items()))
@pytest.mark.parametrize("activation", ["relu", "silu", "identity"])
def test_conv_bn_act_eval_matches_modules(case, activation, monkeypatch):
    torch.manual_seed(0)
    m = randomize_bn(ConvBNAct(**case, activation=activation)).eval()
    ref = copy.deepcopy(_unfused(m))
    x = torch.randn(2, case["in_channels"], 9, 11)
    count = Counter(monkeypatch)
    with torch.no_grad():
        out = m(x)
        expected = ref(x)
    assert_close(out, expected, 1e-5)
    assert count.calls == {"conv_bn_act": 1, "bn_act": 0}
    # with a residual in the epilogue
    r = torch.randn_like(expected)
    with torch.no_grad():
        expected = ref[2](ref[1](ref[0](x)) + r)
        assert_close(m(x, r), expected, 1e-5)


BN_CONFIGS = {
    "default": dict(),
    "momentum0.3": dict(momentum=0.3),
    "cumulative": dict(momentum=None),
    "no_running_stats": dict(track_running_stats=False),
    "no_affine": dict(affine=False),
    "eps1e-3": dict(eps=1e-3),
}


@pytest.mark.parametrize("bn_kwargs", BN_CONFIGS.values(), ids=BN_CONFIGS.keys())
@pytest.mark.parametrize("conv_bias", [False, True], ids=["nobias", "bias"])
def test_conv_bn_act_train_matches_modules(bn_kwargs, conv_bias, monkeypatch):
    torch.manual_seed(0)
    norm = lambda c: nn.BatchNorm2d(c, **bn_kwargs)  # noqa: E731
    m = randomize_bn(ConvBNAct(4, 6, 3, bias=conv_bias, norm_layer=norm, activation="silu"))
    ref = copy.deepcopy(_unfused(m))
    count, units = Counter(monkeypatch), unit_counter(monkeypatch)
    for step in range(3):  # several steps: momentum=None averages over num_batches_tracked
        x = torch.randn(3, 4, 7, 5)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        r = torch.randn(3, 6, 7, 5)
        r1, r2 = r.clone().requires_grad_(), r.clone().requires_grad_()
        out = m(x1, r1)
        expected = ref[2](ref[1](ref[0](x2)) + r2)
        assert_close(out, expected, 1e-5, f"output, step {step}")
        g = torch.randn_like(out)
        out.backward(g)
        expected.backward(g)
        assert_close(x1.grad, x2.grad, 1e-5, "grad x")
        assert_close(r1.grad, r2.grad, 1e-5, "grad residual")
        for (name, p), q in zip(m.named_parameters(), ref.parameters()):
            assert_close(p.grad, q.grad, 1e-5, f"grad {name}", atol=1e-4)  # conv.bias: zero but for rounding noise
        for (name, b), c in zip(m.named_buffers(), ref.buffers()):
            if b.dtype.is_floating_point:
                assert_close(b, c, 1e-6, name)
            else:
                assert torch.equal(b, c), name
    # per step: the forward's BN, and the backward's recomputed SiLU input (bn(y) + residual)
    assert units.calls == {"forward": 3, "applied": 6}
    assert count.calls == {"conv_bn_act": 0, "bn_act": 0}  # BatchNorm's CPU kernels, called directly
    # and eval afterwards, with the statistics it learned
    m.eval(), ref.eval()
    x = torch.randn(2, 4, 6, 6)
    with torch.no_grad():
        assert_close(m(x), ref(x), 1e-5, "eval after training")


def test_train_rejects_one_value_per_channel():
    m = ConvBNAct(3, 4, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        m(torch.randn(1, 3, 1, 1))


def test_frozen_bn_trains_affine_through_fused_op(monkeypatch):
    """BN in eval inside a training model: running stats used, not updated; grads
    reach the BN weight/bias through the fused conv_bn_act (frozen-BN fine-tuning)."""
    torch.manual_seed(0)
    m = randomize_bn(ConvBNAct(4, 6, 3))
    m.train()
    fastres.nn.freeze_bn(m)
    assert m.training and not m.bn.training
    ref = copy.deepcopy(_unfused(m))
    stats = [b.clone() for b in m.bn.buffers()]
    count = Counter(monkeypatch)
    x = torch.randn(2, 4, 8, 8)
    out, expected = m(x), ref(x)
    assert_close(out, expected, 1e-5)
    out.square().sum().backward()
    expected.square().sum().backward()
    for p, q in zip(m.parameters(), ref.parameters()):
        assert p.grad is not None
        assert_close(p.grad, q.grad, 1e-5)
    assert all(torch.equal(a, b) for a, b in zip(stats, m.bn.buffers()))
    assert count.calls == {"conv_bn_act": 1, "bn_act": 0}
    fastres.nn.freeze_bn(m, affine=False)
    assert not m.bn.weight.requires_grad and not m.bn.bias.requires_grad


# ----------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------

BLOCKS = {
    "basic": (BasicBlock, tvr.BasicBlock, dict(inplanes=8, planes=16, stride=2)),
    "basic_identity": (BasicBlock, tvr.BasicBlock, dict(inplanes=16, planes=16)),
    "bottleneck": (Bottleneck, tvr.Bottleneck, dict(inplanes=16, planes=8, stride=2)),
    "bottleneck_grouped": (Bottleneck, tvr.Bottleneck, dict(inplanes=16, planes=8, groups=4, base_width=8)),
    "bottleneck_dilated": (Bottleneck, tvr.Bottleneck, dict(inplanes=32, planes=8, dilation=2)),
}


def _blocks(name, seed=0):
    fr_cls, tv_cls, kw = BLOCKS[name]
    kw = dict(kw)
    expansion = fr_cls.expansion
    if kw.get("stride", 1) != 1 or kw["inplanes"] != kw["planes"] * expansion:
        kw["downsample"] = nn.Sequential(
            nn.Conv2d(kw["inplanes"], kw["planes"] * expansion, 1, stride=kw.get("stride", 1), bias=False),
            nn.BatchNorm2d(kw["planes"] * expansion),
        )
    torch.manual_seed(seed)
    tv = randomize_bn(tv_cls(**kw))
    fr = fr_cls(**copy.deepcopy(kw))
    fr.load_state_dict(tv.state_dict())
    return fr, tv


@pytest.mark.parametrize("name", BLOCKS)
def test_block_state_dict_is_torchvision(name):
    fr, tv = _blocks(name)
    assert list(fr.state_dict()) == list(tv.state_dict())
    assert [n for n, _ in fr.named_modules()] == [n for n, _ in tv.named_modules()]
    tv.load_state_dict(fr.state_dict(), strict=True)


@pytest.mark.parametrize("name", BLOCKS)
def test_block_eval_fuses_and_matches(name, monkeypatch):
    fr, tv = _blocks(name)
    fr.eval(), tv.eval()
    x = torch.randn(2, fr.conv1.in_channels, 9, 10).contiguous(memory_format=torch.channels_last)
    count = Counter(monkeypatch)
    with torch.no_grad():
        assert_close(fr(x), tv(x), 1e-5)
    n_convs = 3 if isinstance(fr, Bottleneck) else 2
    assert count.calls == {"conv_bn_act": n_convs + (fr.downsample is not None), "bn_act": 0}


@pytest.mark.parametrize("name", BLOCKS)
def test_block_train_step_matches(name, monkeypatch):
    fr, tv = _blocks(name)
    fr.train(), tv.train()
    x = torch.randn(2, fr.conv1.in_channels, 9, 10)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    count, units = Counter(monkeypatch), unit_counter(monkeypatch)
    cpu = Counter(monkeypatch, _cpu_bn, {"native": "bn_act_native", "backward": "bn_act_train_backward",
                                         "aten": "bn_act"})
    out, expected = fr(x1), tv(x2)
    assert_close(out, expected, 1e-5)
    n_convs = 3 if isinstance(fr, Bottleneck) else 2
    n_units = n_convs + (fr.downsample is not None)
    assert units.calls == {"forward": n_units, "applied": n_units}
    g = torch.randn_like(out)
    out.backward(g), expected.backward(g)
    assert_close(x1.grad, x2.grad, 1e-5, "grad x")
    for (name, p), q in zip(fr.named_parameters(), tv.parameters()):
        assert_close(p.grad, q.grad, 1e-5, f"grad {name}")
    for (name, b), c in zip(fr.named_buffers(), tv.buffers()):
        assert_close(b.double(), c.double(), 1e-6, name)
    # the backward recomputes each deferred activation (all but the last conv's) once
    assert units.calls == {"forward": n_units, "applied": n_units + n_convs - 1}
    assert count.calls == {"conv_bn_act": 0, "bn_act": 0}  # the CPU kernels, called directly
    if _cpu_bn.NATIVE:  # fastres's, forward and backward, ATen's BatchNorm kernels not at all
        assert cpu.calls == {"native": n_units + n_convs - 1, "backward": n_units, "aten": 0}


@pytest.mark.parametrize("activation", ["silu", "identity"])
def test_block_other_activations(activation):
    fr = randomize_bn(Bottleneck(16, 4, activation=activation)).eval()
    ref = copy.deepcopy(fr)
    fused = fastres.nn.make_activation(activation)
    x = torch.randn(1, 16, 6, 6)
    with torch.no_grad():
        out = fused(ref.bn1(ref.conv1(x)))
        out = fused(ref.bn2(ref.conv2(out)))
        expected = fused(ref.bn3(ref.conv3(out)) + x)
        assert_close(fr(x), expected, 1e-5)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_unfusable_parts_run_as_modules(train):
    """GroupNorm instead of BN, a GELU, a custom downsample: torchvision's output anyway."""
    torch.manual_seed(0)
    norm = lambda c: nn.GroupNorm(2, c)  # noqa: E731
    fr = BasicBlock(8, 8, norm_layer=norm)
    fr.relu = nn.GELU()
    fr.downsample = nn.Sequential(nn.AvgPool2d(1), nn.Conv2d(8, 8, 1))
    fr.bn1 = nn.BatchNorm2d(8)  # one fusable conv/BN pair, with an unfusable activation
    tv = tvr.BasicBlock(8, 8, norm_layer=norm)
    tv.bn1, tv.relu, tv.downsample = nn.BatchNorm2d(8), nn.GELU(), nn.Sequential(nn.AvgPool2d(1), nn.Conv2d(8, 8, 1))
    tv.load_state_dict(fr.state_dict())
    fr.train(train), tv.train(train)
    x = torch.randn(2, 8, 5, 5)
    assert_close(fr(x), tv(x), 1e-5)


def test_sync_batchnorm_eval_is_fused(monkeypatch):
    fr, tv = _blocks("basic")
    fr = nn.SyncBatchNorm.convert_sync_batchnorm(fr).eval()
    tv.eval()
    count = Counter(monkeypatch)
    x = torch.randn(1, 8, 6, 6)
    with torch.no_grad():
        assert_close(fr(x), tv(x), 1e-5)
    assert count.calls["conv_bn_act"] == 3


# ----------------------------------------------------------------------------
# The eval-mode scale/shift cache never goes stale.
# ----------------------------------------------------------------------------


def _eval_pair():
    torch.manual_seed(0)
    m = randomize_bn(ConvBNAct(3, 4, 3, bias=True)).eval()
    return m, _unfused(m)  # ref shares the modules: sees every edit


def _check(m, ref, x):
    with torch.no_grad():
        assert_close(m(x), ref(x), 1e-5)


def test_cache_hits_and_is_used():
    m, ref = _eval_pair()
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        m(x)
        entry = m._fastres_cache._entries["bn", "onednn"]
        m(x)
        assert m._fastres_cache._entries["bn", "onednn"] is entry


@pytest.mark.parametrize("edit", [
    "inplace_weight", "inplace_running_var", "inplace_conv_bias", "eps", "load_state_dict",
    "new_parameter", "optimizer_step", "to_double_and_back",
])
def test_cache_invalidation(edit):
    m, ref = _eval_pair()
    x = torch.randn(1, 3, 5, 5)
    _check(m, ref, x)
    with torch.no_grad():
        if edit == "inplace_weight":
            m.bn.weight.mul_(2)
        elif edit == "inplace_running_var":
            m.bn.running_var.add_(3)
        elif edit == "inplace_conv_bias":
            m.conv.bias.add_(1)
        elif edit == "eps":
            m.bn.eps = 0.5
        elif edit == "load_state_dict":
            other = randomize_bn(ConvBNAct(3, 4, 3, bias=True), seed=5)
            m.load_state_dict(other.state_dict())
        elif edit == "new_parameter":
            m.bn.bias = nn.Parameter(torch.randn(4))
            ref[1].bias = m.bn.bias
        elif edit == "to_double_and_back":
            m.double().float()
    if edit == "optimizer_step":
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(x).sum().backward()  # eval BN, grad mode: weight/bias get gradients
        opt.step()
    _check(m, ref, x)


def test_cache_after_data_edit_needs_clear_or_eval():
    """``.data`` edits bypass version counters (documented): clear_cache or eval() refreshes."""
    m, ref = _eval_pair()
    x = torch.randn(1, 3, 5, 5)
    _check(m, ref, x)
    m.bn.running_mean.data.add_(1)
    fastres.nn.clear_cache(m)
    _check(m, ref, x)
    m.bn.weight.data.mul_(3)
    m.eval()
    _check(m, ref, x)


def test_cache_not_used_when_grad_needed_or_in_inference_mode():
    m, ref = _eval_pair()
    x = torch.randn(1, 3, 5, 5)
    m(x).sum().backward()  # grad mode, BN params require grad: recomputed, not cached
    assert len(m._fastres_cache) == 0
    assert m.bn.weight.grad is not None
    with torch.inference_mode():
        m(x)
    assert len(m._fastres_cache) == 2  # scale_shift and the oneDNN form
    with torch.no_grad():  # inference tensors are not reused outside inference mode
        _check(m, ref, x)
    m.bn.requires_grad_(False)
    m.conv.requires_grad_(False)
    x.requires_grad_()
    m(x).sum().backward()  # nor by autograd (which cannot save inference tensors)
    assert x.grad is not None


def test_pickle_and_deepcopy_drop_the_cache():
    m, _ = _eval_pair()
    with torch.no_grad():
        m(torch.randn(1, 3, 5, 5))
    assert len(m._fastres_cache) == 2  # scale_shift and the oneDNN form
    assert len(copy.deepcopy(m)._fastres_cache) == 0
    assert len(pickle.loads(pickle.dumps(m))._fastres_cache) == 0


# ----------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------


def test_backend_attribute_and_set_backend():
    with pytest.raises(ValueError, match="unknown backend 'mkl'"):
        ConvBNAct(3, 4, backend="mkl")
    m = nn.Sequential(ConvBNAct(3, 4), BasicBlock(4, 4))
    assert fastres.set_backend(m, "torch") is m
    assert all(b.backend == "torch" for b in fastres.nn.modules.fused_modules(m))
    with pytest.raises(ValueError, match="fastres.set_backend: unknown backend 'tritonn'"):
        fastres.set_backend(m, "tritonn")


def test_unusable_backend_says_why_at_forward():
    m = ConvBNAct(3, 4, backend="cuda").eval()
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable"):
        with torch.no_grad():
            m(torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
def test_train_step_through_kernel_bn_act(backend):
    """The train path's bn_act on a kernel backend (CPU: the Triton interpreter)."""
    fr, tv = (m.to(DEVICE) for m in _blocks("basic"))
    fastres.set_backend(fr, backend)
    x = torch.randn(2, 8, 6, 6, device=DEVICE)
    out, expected = fr(x), tv(x)
    assert_close(out, expected, KERNEL_RTOL)
    out.sum().backward(), expected.sum().backward()
    for p, q in zip(fr.parameters(), tv.parameters()):
        assert_close(p.grad, q.grad, max(1e-4, KERNEL_RTOL))


def test_autocast_cpu_bfloat16():
    fr, tv = _blocks("bottleneck")
    fr.eval(), tv.eval()
    x = torch.randn(1, 16, 8, 8)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = fr(x), tv(x)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert_close(out.float(), expected.float(), 5e-2)
    fr.train(), tv.train()
    ref = copy.deepcopy(tv)
    # bf16 gradients through training BN are noisy (a rounding flips a ReLU near 0; on
    # torchvision too): measured against fp32, on enough values per channel to be meaningful.
    x = torch.randn(8, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    expected = ref(x)
    g = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1))
    expected.backward(g)
    for mode in ("low", "min"):
        fastres.set_training_memory(fr, mode)
        fr.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fr(x)
        assert out.dtype == torch.bfloat16
        out.backward(g.bfloat16())
        for (name, p), q in zip(fr.named_parameters(), ref.parameters()):
            assert p.grad.dtype == torch.float32, name  # the bf16 weight copy's gradient, cast back
            assert_close(p.grad, q.grad, 0.25, f"{mode}: grad {name}")


def test_float64_is_float64_throughout():
    fr, tv = _blocks("basic")
    fr.double().eval(), tv.double().eval()
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        out = fr(x)
        assert out.dtype == torch.float64
        assert_close(out, tv(x), 1e-12)


@pytest.mark.parametrize("backend", kernel_backends("conv_bn_act"))
@pytest.mark.parametrize("name", ["basic", "bottleneck_grouped", "bottleneck_dilated"])
def test_blocks_through_kernel_conv_bn_act(name, backend):
    """Eval, and frozen-BN training (the fused op's backward), on a kernel backend
    (CPU: the Triton interpreter); small channel counts keep the interpreter quick."""
    if backend == "cuda" and name == "bottleneck_grouped":
        pytest.skip("the cuda conv kernels need channels per group to be a multiple of 32 "
                    "(docs/cuda_conv.md); backend=None routes such convs to triton")
    fr, tv = (m.to(DEVICE) for m in _blocks(name))
    fastres.set_backend(fr, backend)
    fr.eval(), tv.eval()
    x = torch.randn(1, fr.conv1.in_channels, 7, 6, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert_close(fr(x), tv(x), KERNEL_RTOL)
    fr.train(), tv.train()
    fastres.nn.freeze_bn(fr), fastres.nn.freeze_bn(tv)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, expected = fr(x1), tv(x2)
    g = torch.randn_like(expected)
    out.backward(g), expected.backward(g)
    assert_close(x1.grad, x2.grad, KERNEL_RTOL, "grad x")
    for (pname, p), q in zip(fr.named_parameters(), tv.parameters()):
        assert_close(p.grad, q.grad, max(1e-4, KERNEL_RTOL), pname)


def test_conv_bn_act_from_modules_shares_them():
    conv, bn = nn.Conv2d(3, 4, 3, padding=1, bias=False), randomize_bn(nn.BatchNorm2d(4))
    m = ConvBNAct.from_modules(conv, bn, nn.SiLU(), backend="torch").eval()
    assert m.conv is conv and m.bn is bn and m.activation == "silu" and m.backend == "torch"
    assert ConvBNAct.from_modules(conv, bn).activation == "identity"
    m.act = nn.GELU()  # not fusable: applied after the fused op
    assert m.activation is None
    x = torch.randn(1, 3, 5, 5)
    with torch.no_grad():
        assert_close(m(x), F.gelu(bn.eval()(conv(x))), 1e-5)
