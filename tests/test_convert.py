"""fastres.convert: torchvision (and timm) ResNets to fastres, same keys, same outputs.

Also: the input is never mutated (inplace=False), parameters are shared with
inplace=True, modified models convert what can be fused and report the rest.
"""
import copy
import warnings

import pytest
import torch
from torch import nn

import fastres
from fastres.convert import MODEL, ConversionReport
from fastres.nn import BasicBlock, Bottleneck

torchvision = pytest.importorskip("torchvision")
import torchvision.models as tvm  # noqa: E402
from torchvision.models import resnet as tvr  # noqa: E402

from test_nn import assert_as_accurate, assert_close, randomize_bn  # noqa: E402


def tv_model(name="resnet18", seed=0, **kwargs):
    torch.manual_seed(seed)
    return randomize_bn(getattr(tvm, name)(**kwargs), seed).eval()


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def same_outputs(a, b, x, train=False, rtol=1e-4):
    a, b = a.train(train), b.train(train)
    with torch.no_grad():
        assert_close(a(x), b(x), rtol)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnext50_32x4d"])
def test_convert_torchvision(name):
    tv = tv_model(name)
    before, types = snapshot(tv)
    fr = fastres.convert(tv)
    assert type(fr) is fastres.models.ResNet
    report = fr.fastres_conversion
    assert isinstance(report, ConversionReport)
    assert not report.unconverted and not report.unfused
    assert report.converted[MODEL].endswith("fastres.models.ResNet")
    assert all(isinstance(b, (BasicBlock, Bottleneck)) for layer in (fr.layer1, fr.layer4) for b in layer)
    assert list(fr.state_dict()) == list(tv.state_dict())
    assert [n for n, _ in fr.named_modules()] == [n for n, _ in tv.named_modules()]
    # the input is untouched and shares nothing
    after, types_after = snapshot(tv)
    assert types_after == types and all(torch.equal(before[k], after[k]) for k in before)
    tv_ptrs = {p.data_ptr() for p in tv.parameters()}
    assert not any(p.data_ptr() in tv_ptrs for p in fr.parameters())
    x = torch.randn(1, 3, 64, 64)
    same_outputs(fr, tv, x)
    tv.load_state_dict(fr.state_dict(), strict=True)
    assert fr.num_features == tv.fc.in_features


def test_convert_train_mode_and_running_stats():
    tv = tv_model("resnet18")
    fr = fastres.convert(tv)
    fr.train(), tv.train()
    x = torch.randn(2, 3, 64, 64)
    out, expected = fr(x), tv(x)
    assert_close(out, expected, 1e-4)
    for (k, a), b in zip(fr.state_dict().items(), tv.state_dict().values()):
        assert_close(a.double(), b.double(), 1e-4, k)


def test_inplace_shares_parameters():
    tv = tv_model("resnet18")
    fr = fastres.convert(tv, inplace=True)
    assert fr is not tv  # a fastres.models.ResNet shell around the same modules
    assert all(p is q for p, q in zip(fr.parameters(), tv.parameters()))
    assert fr.layer1 is tv.layer1 and isinstance(tv.layer1[0], BasicBlock)  # blocks replaced in place
    with torch.no_grad():
        tv.fc.bias.add_(1)
    x = torch.randn(1, 3, 32, 32)
    same_outputs(fr, tv, x)


def test_modified_model_new_fc_and_stem():
    tv = tv_model("resnet18")
    tv.fc = nn.Sequential(nn.Dropout(0.1), nn.Linear(512, 10))
    tv.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=True)  # grayscale stem, with a bias
    tv.maxpool = nn.Identity()
    fr = fastres.convert(tv)
    assert not fr.fastres_conversion.unconverted
    assert fr.num_features == 512 and fr.num_classes is None
    x = torch.randn(2, 1, 48, 40)
    same_outputs(fr, tv, x)
    fr.fc[0].p = tv.fc[0].p = 0.0  # train mode: no random dropout
    fr.train(), tv.train()
    assert_close(fr(x), tv(x), 1e-4)


def test_conv_bias_is_folded():
    tv = tv_model("resnet50")
    block = tv.layer2[0]
    for conv in (block.conv1, block.conv3, block.downsample[0]):
        conv.bias = nn.Parameter(torch.randn(conv.out_channels))
    fr = fastres.convert(tv)
    assert "layer2.0" in fr.fastres_conversion.converted
    x = torch.randn(2, 3, 64, 64)
    same_outputs(fr, tv, x)
    tv64 = copy.deepcopy(tv).double()
    g = torch.randn(2, 1000)  # (not out.sum(): through a training BN its gradient is ~0, pure noise)
    outs = []
    for m in (fr, tv, tv64):
        m.train()
        outs.append(m(x.to(next(m.parameters()).dtype)))
        outs[-1].backward(g.to(outs[-1].dtype))
    assert_close(outs[0], outs[1], 1e-4)
    for name in ("conv1.weight", "conv1.bias", "conv3.weight", "downsample.0.weight"):
        grads = [dict(m.layer2[0].named_parameters())[name].grad for m in (fr, tv, tv64)]
        assert_as_accurate(*grads, what=name)


@pytest.mark.parametrize("edit, reason", [
    (lambda b: setattr(b, "bn1", nn.GroupNorm(4, b.bn1.num_features)), "bn1: GroupNorm is not an nn.BatchNorm2d"),
    (lambda b: setattr(b, "relu", nn.GELU()), "relu: activation GELU is not one of"),
    (lambda b: setattr(b, "relu", nn.ReLU6(inplace=True)), "relu: activation ReLU6"),
    (lambda b: setattr(b.conv2, "padding_mode", "reflect"), "conv2: conv padding_mode='reflect'"),
    (lambda b: b.bn2.register_forward_hook(lambda *a: None), "bn2: the BatchNorm has hooks"),
    (lambda b: b.register_forward_pre_hook(lambda *a: None), "the block has hooks"),
], ids=["groupnorm", "gelu", "relu6", "reflect-padding", "bn-hook", "block-hook"])
def test_unsupported_blocks_are_left_and_reported(edit, reason):
    tv = tv_model("resnet18")
    edit(tv.layer2[1])
    with pytest.warns(UserWarning, match="left unconverted"):
        fr = fastres.convert(tv)
    report = fr.fastres_conversion
    assert list(report.unconverted) == ["layer2.1"]
    assert reason in report.unconverted["layer2.1"]
    assert type(fr.layer2[1]) is tvr.BasicBlock and isinstance(fr.layer2[0], BasicBlock)
    assert "layer2.1" in str(report)
    x = torch.randn(2, 3, 64, 64)
    same_outputs(fr, tv, x)
    same_outputs(fr, tv, x, train=True)


def test_subclass_with_custom_forward_is_left():
    class Mine(tvr.BasicBlock):
        def forward(self, x):
            return super().forward(x) * 2

    tv = tv_model("resnet18")
    old = tv.layer3[1]
    tv.layer3[1] = Mine(256, 256)
    tv.layer3[1].load_state_dict(old.state_dict())
    fr = fastres.convert(tv, warn=False)
    assert "Mine overrides forward" in fr.fastres_conversion.unconverted["layer3.1"]
    same_outputs(fr, tv, torch.randn(1, 3, 64, 64))


def test_model_with_custom_forward_keeps_class_and_converts_blocks():
    class Backbone(tvr.ResNet):
        def forward(self, x):
            return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))

    torch.manual_seed(0)
    tv = randomize_bn(Backbone(tvr.Bottleneck, [1, 1, 1, 1])).eval()
    fr = fastres.convert(tv, warn=False)
    assert type(fr) is Backbone and isinstance(fr.layer1[0], Bottleneck)
    assert "overrides forward" in fr.fastres_conversion.unconverted[MODEL]
    same_outputs(fr, tv, torch.randn(1, 3, 32, 32))


def test_nested_model_and_already_fastres():
    class Detector(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = tv_model("resnet18")
            self.head = nn.Linear(1000, 4)

        def forward(self, x):
            return self.head(self.backbone(x))

    det = Detector().eval()
    fr = fastres.convert(det, backend="torch")
    assert type(fr) is Detector and type(fr.backbone) is fastres.models.ResNet
    assert fr.backbone.backend == "torch" and fr.backbone.layer1[0].backend == "torch"
    assert set(fr.fastres_conversion.converted) >= {"backbone", "backbone.layer1.0"}
    same_outputs(fr, det, torch.randn(1, 3, 32, 32))
    again = fastres.convert(fr)
    assert not again.fastres_conversion.converted


def test_convert_checks_arguments():
    with pytest.raises(ValueError, match="fastres.convert: unknown backend 'fast'"):
        fastres.convert(tv_model(), backend="fast")
    with pytest.raises(TypeError, match="expected an nn.Module"):
        fastres.convert("resnet18")


def test_no_warning_when_everything_converts():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastres.convert(tv_model())


# ----------------------------------------------------------------------------
# timm (optional)
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_convert_timm(name):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model(name, pretrained=False, num_classes=7)).eval()
    fr = fastres.convert(model)
    report = fr.fastres_conversion
    assert not report.unconverted
    assert type(fr) is type(model)  # timm's ResNet class is kept; its blocks are fastres blocks
    blocks = [m for m in fr.modules() if isinstance(m, (BasicBlock, Bottleneck))]
    assert blocks and all(type(b).__name__.startswith("Timm") for b in blocks)
    assert hasattr(blocks[0], "act1") and not hasattr(blocks[0], "relu")
    assert list(fr.state_dict()) == list(model.state_dict())
    x = torch.randn(2, 3, 64, 64)
    same_outputs(fr, model, x)
    same_outputs(fr, model, x, train=True)


def test_convert_timm_with_unfusable_parts():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_bn(timm.create_model("seresnet18", pretrained=False, num_classes=5)).eval()
    with pytest.warns(UserWarning, match="se is SEModule"):
        fr = fastres.convert(model)
    assert not fr.fastres_conversion.converted
    same_outputs(fr, model, torch.randn(1, 3, 32, 32))
