"""Prepared forms (fastres/nn/_prepared.py ``PreparedCache``): computed once, never stale, never
while tracing; the CPU oneDNN path they feed matches the reference in every dtype."""
import copy

import pytest
import torch
import torchvision
from torch import nn

import fastres
from fastres import _onednn
from fastres.nn import ConvBNAct
from conftest import DEVICE, kernel_backends
from test_nn import randomize_bn

CL = torch.channels_last


def max_rel_err(actual, expected):
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# Each setup: (model dtype, input dtype, input format, backend, autocast dtype, the kinds it prepares).
FORMS = {
    "onednn_fp32_cl": (torch.float32, torch.float32, CL, None, None, {"scale_shift", "onednn"}),
    "onednn_fp32_nchw": (torch.float32, torch.float32, torch.contiguous_format, "torch", None, {"scale_shift", "onednn"}),
    "onednn_bf16": (torch.bfloat16, torch.bfloat16, CL, None, None, {"scale_shift", "onednn"}),
    "onednn_fp16": (torch.float16, torch.float16, CL, None, None, {"scale_shift", "onednn"}),
    "onednn_autocast_bf16": (torch.float32, torch.float32, CL, None, torch.bfloat16, {"scale_shift", "weight", "onednn"}),
    "reference_fp64": (torch.float64, torch.float64, CL, None, None, {"scale_shift"}),
    "triton": (torch.float32, torch.float32, CL, "triton", None, {"scale_shift", "triton"}),
    "cuda": (torch.bfloat16, torch.bfloat16, CL, "cuda", None, {"scale_shift", "cuda"}),
}
# The kernel backends run on DEVICE (CPU tensors under the Triton interpreter when there is no GPU).
SKIP = {p.id: p.marks for p in kernel_backends("conv_bn_act")}


def _form_params():
    return [pytest.param(k, id=k, marks=SKIP.get(k, ())) for k in FORMS]


class Setup:
    def __init__(self, form, seed=0):
        self.mdtype, self.xdtype, self.fmt, backend, self.autocast, self.kinds = FORMS[form]
        torch.manual_seed(seed)
        m = randomize_bn(ConvBNAct(3, 4, 3, bias=True, backend=backend))
        with torch.no_grad():
            m.conv.weight.normal_()  # outputs of a few units: every edit below shows
        self.device = DEVICE if backend in ("triton", "cuda") else torch.device("cpu")
        self.m = m.to(self.device, self.mdtype).eval()
        self.x = torch.randn(2, 3, 6, 5).to(self.device, self.xdtype).contiguous(memory_format=self.fmt)
        low = self.autocast is not None or self.xdtype in (torch.bfloat16, torch.float16)
        self.rtol = 2e-2 if low else 1e-5

    def run(self, m=None):
        m = self.m if m is None else m
        with torch.no_grad(), torch.autocast(self.device.type, self.autocast or torch.bfloat16,
                                             enabled=self.autocast is not None):
            return m(self.x)

    def expected(self):
        """The unfused modules in fp64 (they share every parameter with the fused module)."""
        ref = copy.deepcopy(nn.Sequential(self.m.conv, self.m.bn, self.m.act)).cpu().double()
        with torch.no_grad():
            return ref(self.x.cpu().double())

    def check(self):
        out = self.run()
        assert out.dtype == (self.autocast or self.xdtype)
        err = max_rel_err(out.cpu(), self.expected())
        assert err <= self.rtol, f"stale or wrong: max error {err:.3g} relative to the output's max"

    def values(self):
        return {k: e[3] for k, e in self.m._fastres_cache._entries.items()}


def test_forms_prepared_once_and_reused(onednn_16bit):
    for form in FORMS:
        if SKIP.get(form):
            continue
        s = Setup(form)
        s.check()
        first = s.values()
        assert {kind for (_, kind) in first} == s.kinds, form
        s.check()
        second = s.values()
        assert all(second[k] is v for k, v in first.items()), f"{form}: prepared again without an edit"


@pytest.mark.parametrize("form", _form_params())
@pytest.mark.parametrize("edit", [
    "inplace_conv_weight", "inplace_bn_weight", "inplace_running_var", "inplace_conv_bias", "eps",
    "load_state_dict", "new_parameter", "optimizer_step", "dtype_roundtrip", "to_channels_last", "train_eval",
    "inference_mode_edit",
])
def test_prepared_forms_never_stale(form, edit):
    s = Setup(form)
    m = s.m
    s.check()
    before = s.values()
    with torch.no_grad():
        if edit == "inplace_conv_weight":
            m.conv.weight.mul_(-1.5)
        elif edit == "inplace_bn_weight":
            m.bn.weight.mul_(2)
        elif edit == "inplace_running_var":
            m.bn.running_var.add_(3)
        elif edit == "inplace_conv_bias":
            m.conv.bias.add_(1)
        elif edit == "eps":
            m.bn.eps = 0.5
        elif edit == "load_state_dict":
            other = randomize_bn(ConvBNAct(3, 4, 3, bias=True), seed=5).to(s.device, s.mdtype)
            m.load_state_dict(other.state_dict())
        elif edit == "new_parameter":
            m.conv.weight = nn.Parameter(torch.randn_like(m.conv.weight))
        elif edit == "dtype_roundtrip":
            other = torch.float32 if s.mdtype == torch.float64 else torch.float64
            m.to(other).to(s.mdtype)
        elif edit == "to_channels_last":
            m.to(memory_format=CL)
    if edit == "inference_mode_edit":
        with torch.inference_mode():
            m.bn.running_mean.add_(1)  # a normal tensor edited in inference mode: versioned
    if edit == "optimizer_step":
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        with torch.autocast(s.device.type, s.autocast or torch.bfloat16, enabled=s.autocast is not None):
            m(s.x).float().sum().backward()  # grad mode, parameters require grad: nothing cached
        opt.step()
    if edit == "train_eval":
        m.train()
        with torch.no_grad():
            m(s.x.to(s.mdtype))  # batch statistics: updates running_mean/var
        m.eval()
    s.check()
    after = s.values()
    if s.kinds == {"scale_shift"} and edit in ("inplace_conv_weight", "new_parameter", "to_channels_last"):
        return  # no prepared form reads the conv weight: there is nothing to prepare again
    assert any(after.get(k) is not v for k, v in before.items()), f"{edit}: nothing was prepared again"


def test_grad_mode_caches_when_no_parameter_requires_grad():
    s = Setup("onednn_fp32_cl")
    s.m.requires_grad_(False)
    out = s.m(s.x)  # grad mode on
    assert ("bn", "onednn") in s.m._fastres_cache._entries
    assert not out.requires_grad
    s.m.bn.requires_grad_(True)  # frozen-statistics fine-tuning: autograd must reach bn.weight
    s.m(s.x).sum().backward()
    assert s.m.bn.weight.grad is not None


def test_model_built_and_run_in_inference_mode():
    """Inference tensors have no version counter: the forms are reused while nothing changes,
    and load_state_dict (in-place copies, unversioned) drops them."""
    with torch.inference_mode():
        s = Setup("onednn_fp32_cl")
        s.check()
        first = s.values()
        s.check()
        assert all(s.values()[k] is v for k, v in first.items())
        other = randomize_bn(ConvBNAct(3, 4, 3, bias=True), seed=5)
        s.m.load_state_dict(other.state_dict())
        s.check()
        assert not any(s.values().get(k) is v for k, v in first.items())
    s.check()


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("tracer", ["compile", "export", "jit_trace", "fx"])
def test_nothing_prepared_while_tracing(tracer, monkeypatch):
    s = Setup("onednn_fp32_cl")
    calls = []
    monkeypatch.setattr(_onednn, "prepare", lambda *a, f=_onednn.prepare, **k: calls.append(1) or f(*a, **k))
    m, x = s.m, s.x
    with torch.no_grad():
        if tracer == "compile":
            out = torch.compile(m, backend="eager", fullgraph=True)(x)
        elif tracer == "export":
            out = torch.export.export(m, (x,)).module()(x)
        elif tracer == "jit_trace":
            out = torch.jit.trace(m, (x,), check_trace=False)(x)
        else:
            out = torch.fx.symbolic_trace(m, concrete_args={"residual": None})(x)
    assert calls == [] and len(m._fastres_cache) == 0
    assert max_rel_err(out, s.expected()) <= 1e-5


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
def test_resident_memory_is_one_prepared_copy(onednn_16bit):
    """ResNet-18 bf16 on CPU: the prepared forms are one folded weight per conv in the compute dtype
    (bf16, or fp32 where oneDNN has no bf16) (+ fp32 biases and the fp32 BN scale/shift the op is
    validated with)."""
    model = fastres.models.resnet18().to(torch.bfloat16).eval().to(memory_format=CL)
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32, dtype=torch.bfloat16).contiguous(memory_format=CL))
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    weight_bytes = sum(c.weight.numel() * _onednn.compute_dtype(torch.bfloat16).itemsize for c in convs)
    bias_bytes = sum(c.out_channels * (4 + 2) for c in convs)  # fp32 bias + the binary post-op's bf16 copy
    prepared = sum(m._fastres_cache.nbytes("onednn") for m in fastres.nn.modules.fused_modules(model))
    kinds = {k for m in fastres.nn.modules.fused_modules(model) for (_, k) in m._fastres_cache._entries}
    assert kinds == {"onednn", "scale_shift"}
    assert weight_bytes <= prepared <= weight_bytes + bias_bytes
    vectors = sum(m._fastres_cache.nbytes("scale_shift") for m in fastres.nn.modules.fused_modules(model))
    assert vectors == sum(c.out_channels * 8 for c in convs)


@pytest.mark.parametrize("backend", kernel_backends("conv_bn_act"))
def test_kernels_get_a_channels_last_weight_prepared_once(backend, monkeypatch):
    """The kernels read the weight as KRSC: a channels_last weight is that already (their
    ``permute(0, 2, 3, 1).contiguous()`` copies nothing), prepared once per conv."""
    s = Setup(backend)
    s.check()
    first = s.values()
    s.check()
    (key, w), = ((k, v) for k, v in s.values().items() if k[1] == backend)
    assert w is first[key]
    assert w.is_contiguous(memory_format=CL) and w.permute(0, 2, 3, 1).contiguous().data_ptr() == w.data_ptr()


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bn", ["default", "randomized"])
def test_accuracy_rule_against_torchvision(dtype, bn):
    """Logits error against fp32 <= 1.5x torchvision's own error in the same dtype (ResNet-18)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet18().eval()
    if bn == "randomized":
        randomize_bn(tv)
    fr = fastres.convert(copy.deepcopy(tv))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        exact = tv.double()(x.double())
        tv.float()
        tv_err = max_rel_err(tv.to(dtype)(x.to(dtype)), exact)
        fr_err = max_rel_err(fr.to(dtype)(x.to(dtype)), exact)
    assert fr_err <= 1.5 * tv_err, (fr_err, tv_err)


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_resnet_with_one_pixel_layer4(dtype):
    """ResNet-18 at 32x32: layer4 runs on 1x1 maps with a residual (the binary post-op's
    failing case on torch 2.11), fp32 and bf16, batch 1 and 2."""
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18()).eval()
    fr = fastres.convert(copy.deepcopy(tv)).to(dtype).to(memory_format=CL)
    for n in (1, 2):
        x = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            err = max_rel_err(fr(x.to(dtype).contiguous(memory_format=CL)), tv(x))
        assert err < (1e-5 if dtype == torch.float32 else 5e-2), err


def _onednn_forms(model):
    return [e[3] for m in fastres.nn.modules.fused_modules(model)
            for (_, kind), e in m._fastres_cache._entries.items() if kind == "onednn"]


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_prepacked_weight_follows_the_input_size(dtype, monkeypatch, onednn_16bit):
    """A model warmed up on one size then fed another runs the second on weights packed for the
    second (oneDNN packs for an input size): a size seen once runs on the dense folded weight, a
    repeated one gets its own packed copy, and every call's output is the fresh model's."""
    torch.manual_seed(0)
    tv = randomize_bn(torchvision.models.resnet18()).eval().to(dtype)
    model = fastres.convert(copy.deepcopy(tv)).to(memory_format=CL)
    fresh = fastres.convert(copy.deepcopy(tv)).to(memory_format=CL)
    small = torch.randn(1, 3, 16, 16, dtype=dtype).contiguous(memory_format=CL)
    big = torch.randn(2, 3, 64, 64, dtype=dtype).contiguous(memory_format=CL)
    used = []
    monkeypatch.setattr(_onednn.Prepared, "weight",
                        lambda self, x, f=_onednn.Prepared.weight: used.append((self, tuple(x.shape), f(self, x)))
                        or used[-1][2])
    with torch.inference_mode():
        model(small)
        forms = _onednn_forms(model)
        assert forms and all(len(p.packed) == 1 for p in forms if p.pack)
        assert list(forms[0].packed) == [(1, 16, 16)]  # the stem, packed for its input
        expected = fresh(big)
        for call in range(3):
            used.clear()
            out = model(big)
            torch.testing.assert_close(out, expected, rtol=0, atol=0)
            for p, shape, w in used:
                if not p.pack:
                    continue
                geometry = (shape[0], shape[2], shape[3])
                if call == 0 and any(p is q for q in forms):  # a second size, first seen: the dense weight
                    assert w is p._dense and geometry not in p.packed
                else:  # packed for this size (a form made for it packs its first size at once)
                    assert p.packed[geometry] is w
        warmed = [p for p in _onednn_forms(model) if any(p is q for q in forms) and p.pack]
        assert warmed and all(len(p.packed) == 2 and p._dense is None for p in warmed)  # two copies, no dense


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
def test_packed_geometries_are_bounded():
    """At most MAX_PACKED_GEOMETRIES packed weights per conv, the least recently used dropped."""
    conv = randomize_bn(ConvBNAct(8, 8, 3)).eval().to(memory_format=CL)
    limit = _onednn.MAX_PACKED_GEOMETRIES
    sizes = [4 + i for i in range(limit + 2)]
    with torch.inference_mode():
        for size in sizes:
            x = torch.randn(1, 8, size, size).contiguous(memory_format=CL)
            expected = torch.relu(conv.bn(conv.conv(x)))
            for _ in range(2):
                torch.testing.assert_close(conv(x), expected, rtol=1e-5, atol=1e-5)
        (p,) = _onednn_forms(conv)
        assert list(p.packed) == [(1, s, s) for s in sizes[-limit:]]
        weight = conv.conv.weight
        assert p.nbytes() <= (limit + 1) * weight.numel() * 4 + 8 * 8


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("batch", [1, 3])
def test_one_pixel_output_takes_the_packed_path_with_nchw_strides(dtype, batch, onednn_16bit):
    """An NCHW conv with a 1x1 output (layer3-4 of a small input) runs on a packed weight, as a
    channels_last one would (the same memory), and returns F.conv2d's strides and values (8 input
    channels: fp32 convs of 16 or more this small take ATen's conv2d, tests/test_cpu_small_conv.py)."""
    torch.manual_seed(0)
    m = randomize_bn(ConvBNAct(8, 32, 3)).eval().to(dtype)
    x = torch.randn(batch, 8, 1, 1, dtype=dtype)
    with torch.inference_mode():
        out = m(x)
        expected = torch.relu(m.bn(m.conv(x)))
        (p,) = _onednn_forms(m)
    assert p.channels_last and list(p.packed) == [(batch, 1, 1)]
    assert out.stride() == expected.stride() == (32, 1, 1, 1)
    tol = 1e-5 if dtype == torch.float32 else 2e-2  # bf16: the folded weight's rounding, outputs of O(1)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol)


@pytest.mark.skipif(not _onednn._AVAILABLE, reason="PyTorch built without oneDNN")
def test_call_plan_is_reused_and_invalidated(monkeypatch):
    """A module's second like call reruns its plan (no validation, no dispatch); an in-place
    parameter edit, a new input shape or layout and clear_cache each make a new one, and every
    output is the unfused modules'."""
    from fastres import ops

    torch.manual_seed(0)
    m = randomize_bn(ConvBNAct(4, 8, 3)).eval().to(memory_format=CL)
    dispatched = []
    monkeypatch.setattr(ops, "run_conv_bn_act",
                        lambda *a, f=ops.run_conv_bn_act, **k: dispatched.append(1) or f(*a, **k))

    def check(x, planned):
        dispatched.clear()
        with torch.no_grad():
            out = m(x)
            expected = torch.relu(m.bn(m.conv(x)))
        torch.testing.assert_close(out, expected, rtol=2e-2 if x.dtype == torch.bfloat16 else 1e-5, atol=1e-5)
        assert dispatched == ([] if planned else [1])

    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=CL)
    check(x, planned=False)
    check(x, planned=True)
    with torch.no_grad():
        m.bn.weight.mul_(2)  # a parameter edited in place: new forms, new plan
    check(x, planned=False)
    check(x, planned=True)
    check(torch.randn(1, 4, 5, 7).contiguous(memory_format=CL), planned=False)  # another shape
    check(x.contiguous(), planned=False)  # another layout
    check(x, planned=False)
    fastres.nn.clear_cache(m)
    assert not m._fastres_cache.plans
    check(x, planned=False)
    check(x, planned=True)
