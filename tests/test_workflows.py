"""fastres models in the workflows people run ResNets in (CPU; GPU variants skip without CUDA).

* Inference graphs: ``torch.jit.trace``, ``torch.export``, ``torch.compile(fullgraph=True)`` and
  ``torch.onnx.export`` (both exporters, run in onnxruntime) of fastres and converted models, in
  default grad mode, ``no_grad`` and ``inference_mode``: the eager output, no oneDNN op and no
  cached tensor in the graph (BN edits after tracing are seen).
* Models made or changed inside ``torch.inference_mode()`` (inference tensors, which have no
  version counter): every construction path works and the scale/shift cache stays correct.
* FX: ``torch.fx.symbolic_trace`` and torchvision's feature extraction see torchvision's graph.
* Frozen BN (torchvision's ``FrozenBatchNorm2d``) and timm's ``BatchNormAct2d``/``FrozenBatchNormAct2d``
  fused; detection and segmentation models on converted backbones (float64); ``convert`` of a model
  with nothing to convert warns.
* timm's classifier API on ``fastres.models.ResNet``.
"""
import contextlib
import copy
import io

import pytest
import torch

import fastres
import fastres.models as fm

torchvision = pytest.importorskip("torchvision")
import torchvision.models as tvm  # noqa: E402

from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from benchmarks.bench_models import _cuda_graph  # noqa: E402
from test_nn import Counter, assert_close, randomize_bn  # noqa: E402

SHAPE = (1, 3, 64, 64)
GRAD_MODES = {
    "grad": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


# A ResNet with one BasicBlock per stage (the stem, plain and downsampling blocks): the structure
# of resnet18 at half the tracing time, which is what these tests spend.
LAYERS = [1, 1, 1, 1]


def _tv_resnet(seed=0):
    torch.manual_seed(seed)
    return randomize_bn(tvm.ResNet(tvm.resnet.BasicBlock, LAYERS, num_classes=10), seed).eval()


def _fr_resnet():
    return fm.ResNet(fm.resnet.BasicBlock, LAYERS, num_classes=10)


def _model(kind):
    """(fastres model, torchvision twin), eval, same weights."""
    tv = _tv_resnet()
    if kind == "fastres":
        fr = _fr_resnet()
        fr.load_state_dict(tv.state_dict())
    else:
        fr = fastres.convert(tv)
        assert type(fr) is fm.ResNet
    return fr.eval(), tv


def _edit_bn(*models):
    """An in-place edit of BN statistics (versioned: normal tensors, outside inference mode)."""
    with torch.no_grad():
        for m in models:
            m.layer1[0].bn1.running_var.mul_(4)
            m.layer3[0].downsample[1].running_mean.add_(1)


# ----------------------------------------------------------------------------
# Inference graphs
# ----------------------------------------------------------------------------


def _trace(model, x):
    traced = torch.jit.trace(model, x)  # check_trace reruns under no_grad
    assert "mkldnn" not in str(traced.inlined_graph)
    return traced


def _export(model, x):
    ep = torch.export.export(model, (x,))
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert not any("mkldnn" in t for t in targets), targets
    assert not ep.constants  # nothing cached was baked in: BN math reads the buffers
    return ep.module()  # shares the model's parameters and buffers


def _compile(model, x):
    torch._dynamo.reset()
    # aot_eager: dynamo + AOT autograd on fake tensors, where the oneDNN op had no fake kernel;
    # inductor's CPU codegen would add minutes of C++ compilation (GPU test below).
    return torch.compile(model, fullgraph=True, backend="aot_eager")


# Every grad mode for a fastres model; a converted model (the same class, built by convert) under no_grad.
GRAPH_CASES = [("fastres", mode) for mode in GRAD_MODES] + [("converted", "no_grad")]


@pytest.mark.parametrize("kind, mode", GRAPH_CASES, ids=[f"{k}-{m}" for k, m in GRAPH_CASES])
@pytest.mark.parametrize("tool", ["jit_trace", "export", "compile"])
def test_inference_graph(tool, kind, mode):
    fr, tv = _model(kind)
    x = torch.randn(SHAPE)
    build = {"jit_trace": _trace, "export": _export, "compile": _compile}[tool]
    with GRAD_MODES[mode]():
        graph = build(fr, x)
        assert_close(graph(x), fr(x), 1e-4)
        assert_close(graph(x), tv(x), 1e-4)
    _edit_bn(fr, tv)  # nothing stale was captured
    with GRAD_MODES[mode]():
        assert_close(graph(x), tv(x), 1e-4)


@pytest.mark.parametrize("tool", ["jit_trace", "export", "compile"])
def test_inference_graph_of_model_built_in_inference_mode(tool):
    tv = _tv_resnet()
    with torch.inference_mode():
        fr = _fr_resnet().eval()
        fr.load_state_dict(tv.state_dict())
        assert fr.layer1[0].bn1.running_var.is_inference()
        x = torch.randn(SHAPE)
        build = {"jit_trace": _trace, "export": _export, "compile": _compile}[tool]
        graph = build(fr, x)
        assert_close(graph(x), tv(x), 1e-4)


ONNX_CASES = [(False, mode) for mode in GRAD_MODES] + [(True, "no_grad"), (True, "inference_mode")]


@pytest.mark.parametrize(
    "dynamo, mode", ONNX_CASES, ids=[f"{'dynamo' if d else 'torchscript'}-{m}" for d, m in ONNX_CASES]
)
def test_onnx_export_runs_in_onnxruntime(dynamo, mode):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    fr, tv = _model("converted")
    x = torch.randn(SHAPE)
    with GRAD_MODES[mode]():
        if dynamo:
            proto = torch.onnx.export(fr, (x,), dynamo=True, verbose=False).model_proto
        else:
            buf = io.BytesIO()
            torch.onnx.export(fr, (x,), buf, dynamo=False)
            proto = onnx.load_from_string(buf.getvalue())
    ops = {n.op_type for n in proto.graph.node}
    assert {"Conv", "Relu", "Add"} <= ops and all(n.domain in ("", "ai.onnx") for n in proto.graph.node), ops
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert_close(torch.from_numpy(out), tv(x), 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tool", ["compile", "export", "cuda_graph"])
def test_gpu_inference_mode_resnet50(tool):
    """A converted ResNet-50 under inference_mode on the GPU: inductor, export, CUDA-graph capture
    (the model moved to the GPU inside inference_mode: ``.to(device)`` makes inference tensors)."""
    torch.manual_seed(0)
    tv = randomize_bn(tvm.resnet50()).eval()
    fr = fastres.convert(tv)
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.inference_mode():
        tv, fr = tv.cuda(), fr.to("cuda")
        expected = tv(x)
        if tool == "compile":
            torch._dynamo.reset()
            out = torch.compile(fr, fullgraph=True)(x)
        elif tool == "export":
            out = torch.export.export(fr, (x,)).module()(x)
        else:
            replay, _ = _cuda_graph(fr, x)
            out = replay()
        # fp32 on the GPU: TF32 convolutions in both models
        torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())


# ----------------------------------------------------------------------------
# Models made or changed inside torch.inference_mode()
# ----------------------------------------------------------------------------

# Every path that leaves inference tensors in a model; `make(model)` runs inside inference_mode
# on a normally built model (fastres or torchvision) with the reference weights.
def _pickle(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    return buf.getvalue()


def _assign(m):
    with torch.inference_mode(False):  # a model built normally, then loaded with assign=True
        fresh = type(m)(fm.resnet.BasicBlock if type(m) is fm.ResNet else tvm.resnet.BasicBlock, LAYERS,
                        num_classes=10)
    fresh.load_state_dict({k: v.clone() for k, v in m.state_dict().items()}, assign=True)
    return fresh


INFERENCE_PATHS = {
    "construct": None,  # constructor + load_state_dict inside inference_mode
    "convert": "convert",
    "deepcopy": copy.deepcopy,
    "half": lambda m: copy.deepcopy(m).half(),
    "bfloat16": lambda m: copy.deepcopy(m).bfloat16(),
    "double": lambda m: copy.deepcopy(m).double(),
    "torch_load": "torch_load",
    "load_state_dict_assign": _assign,
}
_DTYPE = {"half": torch.float16, "bfloat16": torch.bfloat16, "double": torch.float64}


def _made_in_inference_mode(path, tv, fr_src, pickled):
    """(fastres model, torchvision twin) made by ``path`` inside inference_mode."""
    make = INFERENCE_PATHS[path]
    with torch.inference_mode():
        if path == "construct":
            fr, tv2 = _fr_resnet(), tvm.ResNet(tvm.resnet.BasicBlock, LAYERS, num_classes=10)
            fr.load_state_dict(tv.state_dict())
            tv2.load_state_dict(tv.state_dict())
        elif path == "convert":
            fr, tv2 = fastres.convert(tv), copy.deepcopy(tv)
        elif path == "torch_load":
            fr, tv2 = (torch.load(io.BytesIO(b), weights_only=False) for b in pickled)
        else:
            fr, tv2 = make(fr_src), make(tv)
    return fr.eval(), tv2.eval()


@pytest.mark.parametrize("path", list(INFERENCE_PATHS))
def test_model_made_in_inference_mode(path):
    tv = _tv_resnet()
    fr_src = _fr_resnet()
    fr_src.load_state_dict(tv.state_dict())
    fr_src.eval()
    pickled = (_pickle(fr_src), _pickle(tv)) if path == "torch_load" else None
    fr, tv2 = _made_in_inference_mode(path, tv, fr_src, pickled)
    assert fr.layer1[0].bn1.running_var.is_inference() and fr.conv1.weight.is_inference()
    dtype = _DTYPE.get(path, torch.float32)
    assert fr.conv1.weight.dtype == dtype
    x = torch.randn(SHAPE, dtype=dtype)
    if dtype in (torch.float16, torch.bfloat16):
        # the reference: the same fastres model cast outside inference mode (same kernels)
        ref = copy.deepcopy(fr_src).to(dtype)
        rtol = 1e-6
    else:
        ref, rtol = tv2, (1e-4 if dtype == torch.float32 else 1e-10)
    block = fr.layer1[0]

    def check():
        for ctx in (torch.no_grad, torch.inference_mode, torch.no_grad):  # cached entries of both
            with ctx():
                assert_close(fr(x).double(), ref(x).double(), rtol)

    check()
    assert len(block._fastres_cache) > 0  # the cache is in use
    # PyTorch forbids in-place edits of inference tensors outside inference mode ...
    with torch.no_grad(), pytest.raises(RuntimeError, match="[Ii]nference"):
        block.bn1.running_var.mul_(2)
    # ... and load_state_dict, which copies in place (unversioned inside inference mode), drops the cache.
    new = {k: v.to(dtype) if v.is_floating_point() else v for k, v in _tv_resnet(seed=1).state_dict().items()}
    with torch.inference_mode():
        fr.load_state_dict(new)
        ref.load_state_dict(new)
    check()


def test_inference_tensors_train_forward_then_eval():
    """A training-mode forward inside inference_mode updates running statistics (unversioned);
    ``eval()`` drops the cache."""
    tv = _tv_resnet()
    with torch.inference_mode():
        fr = _fr_resnet()
        fr.load_state_dict(tv.state_dict())
        fr.eval()
        x = torch.randn(4, 3, 32, 32)
        fr(x)
        fr.train()
        tv.train()
        fr(x), tv(x)
        fr.eval()
        tv.eval()
        assert_close(fr(x), tv(x), 1e-4)


def test_inference_tensors_manual_edit_needs_clear_cache():
    """The documented gap: a manual in-place edit of an inference tensor inside inference_mode is
    not versioned; ``fastres.nn.clear_cache`` makes the model see it."""
    tv = _tv_resnet()
    with torch.inference_mode():
        fr = fastres.convert(tv)
        x = torch.randn(SHAPE)
        assert_close(fr(x), tv(x), 1e-4)
        for m in (fr, tv):
            m.layer1[0].bn1.running_var.mul_(4)
            m.layer1[0].bn1.weight.mul_(-1)
        fastres.nn.clear_cache(fr)
        assert_close(fr(x), tv(x), 1e-4)


# ----------------------------------------------------------------------------
# FX: torch.fx.symbolic_trace and torchvision's feature extraction
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_fx_graph_is_torchvision(name):
    """Same node names (train and eval graphs), targets and order as torchvision's model."""
    from torchvision.models.feature_extraction import get_graph_node_names

    tv = getattr(tvm, name)()
    expected = get_graph_node_names(tv)
    assert get_graph_node_names(getattr(fm, name)()) == expected
    assert get_graph_node_names(fastres.convert(tv)) == expected
    g_tv, g_fr = torch.fx.symbolic_trace(tv).graph, torch.fx.symbolic_trace(getattr(fm, name)()).graph
    assert [(n.name, n.op, str(n.target)) for n in g_fr.nodes] == [(n.name, n.op, str(n.target)) for n in g_tv.nodes]


def test_fx_feature_extraction_matches_eager():
    from torchvision.models.feature_extraction import create_feature_extractor

    tv = _tv_resnet()
    fr = fm.ResNet(fm.resnet.BasicBlock, LAYERS, num_classes=10)
    fr.load_state_dict(tv.state_dict())
    fr.eval()
    nodes = {"layer1": "l1", "layer3.0.relu_1": "l3", "layer4": "l4", "flatten": "pooled", "fc": "logits"}
    ex_fr, ex_tv = create_feature_extractor(fr, nodes), create_feature_extractor(tv, nodes)
    traced = torch.fx.symbolic_trace(fr)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        out_fr, out_tv = ex_fr(x), ex_tv(x)
        assert set(out_fr) == set(nodes.values())
        for k in out_fr:
            assert_close(out_fr[k], out_tv[k], 1e-4, k)
        assert_close(out_fr["l4"], fr.forward_features(x), 1e-4)
        assert_close(out_fr["logits"], fr(x), 1e-4)
        assert_close(traced(x), fr(x), 1e-4)


def test_fx_timm_converted_graph_is_timm():
    timm = pytest.importorskip("timm")
    from torchvision.models.feature_extraction import get_graph_node_names

    tm = timm.create_model("resnet18", num_classes=10).eval()
    cm = fastres.convert(tm)
    assert type(cm.layer1[0]) is fastres.nn.TimmBasicBlock
    assert get_graph_node_names(cm) == get_graph_node_names(tm)
    x = torch.randn(SHAPE)
    with torch.no_grad():
        assert_close(torch.fx.symbolic_trace(cm)(x), tm(x), 1e-4)


# ----------------------------------------------------------------------------
# Frozen BN and timm's norm + act layers; detection and segmentation models
# ----------------------------------------------------------------------------

def randomize_norms(model, seed=0):
    """randomize_bn, and the buffers of frozen BNs (torchvision's, timm's)."""
    randomize_bn(model, seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ in ("FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.5, generator=g)
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
    return model


def _n_convs(model):
    return sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())


@pytest.mark.parametrize("name, backward", [("resnet18", True), ("resnet50", False)])
def test_frozen_batchnorm_is_fused_in_eval_and_train(name, backward, monkeypatch):
    torch.manual_seed(0)
    tv = randomize_norms(getattr(tvm, name)(norm_layer=FrozenBatchNorm2d, num_classes=10))
    fr = fastres.convert(tv)
    report = fr.fastres_conversion
    assert type(fr) is fm.ResNet and not report.unconverted and not report.unfused
    x = torch.randn(2, 3, 32, 32)
    calls = Counter(monkeypatch)
    for train in (False, True):  # a frozen BN never uses batch statistics: one fused op per conv
        fr.train(train), tv.train(train)
        with torch.no_grad():
            assert_close(fr(x), tv(x), 1e-4)
    assert calls.calls == {"conv_bn_act": 2 * _n_convs(tv), "bn_act": 0}
    if not backward:
        return
    fr(x).square().mean().backward()  # train mode: gradients reach the convs through the fused op
    tv(x).square().mean().backward()
    for (n, p), q in zip(fr.named_parameters(), tv.parameters()):
        assert_close(p.grad, q.grad, 1e-4, n, atol=1e-7)


def _timm_norm_act(apply_act, frozen):
    timm = pytest.importorskip("timm")
    from functools import partial

    from timm.layers import BatchNormAct2d, freeze_batch_norm_2d

    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, norm_layer=partial(BatchNormAct2d, apply_act=apply_act))
    if frozen:
        model = freeze_batch_norm_2d(model)
    return randomize_norms(model).eval()


@pytest.mark.parametrize("frozen", [False, True], ids=["BatchNormAct2d", "FrozenBatchNormAct2d"])
@pytest.mark.parametrize("apply_act", [False, True], ids=["identity", "relu"])
def test_timm_norm_act_layers(apply_act, frozen):
    """timm's norm + act layers are fused (their activation in the epilogue); one with an activation
    right before the residual add runs unfused, and the report says why."""
    tm = _timm_norm_act(apply_act, frozen)
    norm = type(tm.layer1[0].bn2).__name__
    assert norm == ("FrozenBatchNormAct2d" if frozen else "BatchNormAct2d")
    cm = fastres.convert(tm)
    report = cm.fastres_conversion
    assert not report.unconverted and len(report.converted) == 8
    if apply_act:
        assert set(report.unfused) == {f"layer{i}.{j}.conv2/bn2" for i in range(1, 5) for j in range(2)}
        assert all(f"{norm} applies ReLU before the residual add" in why for why in report.unfused.values())
    else:
        assert not report.unfused
    x = torch.randn(2, 3, 64, 64)
    for train in (False, True):
        cm.train(train), tm.train(train)
        with torch.no_grad():
            assert_close(cm(x), tm(x), 1e-4)


def test_convert_of_a_model_with_nothing_to_convert_warns():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnext26ts")
    with pytest.warns(UserWarning, match="0 module\\(s\\) converted: no recognized ResNet module"):
        out = fastres.convert(model)
    assert not out.fastres_conversion.converted
    assert "no recognized ResNet module" in str(out.fastres_conversion)


def _detector(frozen):
    from torchvision.models.detection import FasterRCNN, fasterrcnn_resnet50_fpn
    from torchvision.models.detection.backbone_utils import _resnet_fpn_extractor

    torch.manual_seed(0)
    small = dict(min_size=96, max_size=128)
    if frozen:  # what weights_backbone=... builds: FrozenBatchNorm2d, the first layers frozen
        backbone = _resnet_fpn_extractor(tvm.resnet18(norm_layer=FrozenBatchNorm2d), 3)
        return randomize_norms(FasterRCNN(backbone, num_classes=91, **small))
    return randomize_norms(fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, **small))


@pytest.mark.parametrize("frozen", [False, True], ids=["batchnorm-resnet50", "frozenbn-resnet18"])
def test_detector_on_converted_backbone_float64(frozen):
    det = _detector(frozen).eval().double()
    cdet = fastres.convert(det)
    report = cdet.fastres_conversion
    assert len(report.converted) == (16 if not frozen else 8) and not report.unconverted and not report.unfused
    images = [torch.rand(3, 80, 112, dtype=torch.float64), torch.rand(3, 96, 96, dtype=torch.float64)]
    with torch.no_grad():
        out, expected = cdet(images), det(images)
    for o, e in zip(out, expected):
        assert o.keys() == e.keys() and len(e["boxes"]) > 0
        for k in e:
            assert o[k].shape == e[k].shape, k
            torch.testing.assert_close(o[k], e[k], rtol=1e-9, atol=1e-9)


def test_deeplab_on_converted_backbone_float64():
    from torchvision.models.segmentation import deeplabv3_resnet50

    torch.manual_seed(0)
    seg = randomize_bn(deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5)).eval().double()
    cseg = fastres.convert(seg)
    assert len(cseg.fastres_conversion.converted) == 16 and not cseg.fastres_conversion.unconverted
    x = torch.randn(1, 3, 64, 64, dtype=torch.float64)
    with torch.no_grad():
        out, expected = cseg(x)["out"], seg(x)["out"]
    assert_close(out, expected, 1e-10)


# ----------------------------------------------------------------------------
# timm's model API on fastres.models.ResNet
# ----------------------------------------------------------------------------


def test_timm_api_matches_timm_resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    tm = randomize_bn(timm.create_model("resnet18", num_classes=10)).eval()
    fr = fm.resnet18(num_classes=10)
    fr.load_state_dict(tm.state_dict())  # timm's resnet18 has torchvision's keys
    fr.eval()
    x = torch.randn(2, 3, 32, 32)
    assert fr.num_features == tm.num_features == 512
    assert type(fr.get_classifier()) is type(tm.get_classifier()) is torch.nn.Linear

    def same(what):
        with torch.no_grad():
            out, expected = what(fr), what(tm)
        assert out.shape == expected.shape
        assert_close(out, expected, 1e-4)

    same(lambda m: m.forward_features(x))
    same(lambda m: m.forward_head(m.forward_features(x), pre_logits=True))
    same(lambda m: m(x))
    for args in [(0, ""), (0, "max"), (0, None), (0, "avg")]:  # None keeps the current pooling
        fr.reset_classifier(*args), tm.reset_classifier(*args)
        assert not fr.fc.training
        same(lambda m: m(x))
    assert fr(x).shape == (2, 512)
    fr.reset_classifier(7)
    assert fr.num_classes == 7 and fr(x).shape == (2, 7)
    with pytest.raises(ValueError, match="global_pool 'catavgmax'"):
        fr.reset_classifier(0, "catavgmax")
    with pytest.raises(ValueError, match="needs num_classes=0"):
        fr.reset_classifier(3, "")
