"""The ``"cudnn"`` backend of conv_bn_act (``fastres/_cudnn.py``).

On CPU: the folding (:func:`fold_bn`), the fused op ``fastres::conv_bias_relu_cudnn``
(its CPU body computes cuDNN's math: fp32 epilogue, one rounding), its fake
kernel and autograd (opcheck, fp64 gradcheck), the accuracy rule of folding in
bf16, and the backend's name validation. On a GPU (skipped without one): the
backend against the reference for every dtype, format and activation.
"""
import pytest
import torch
import torch.nn.functional as F

from conftest import DEVICE, FORMATS, TOL, ACTIVATIONS
from fastres import _cudnn, backends, ops, reference

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _cudnn_backend(*args):
    """What ``backend="cudnn"`` runs for validated ``conv_bn_act`` arguments, on any device."""
    return backends.select("test", "conv_bn_act", "cudnn", args).fn(*args)


def _inputs(dtype, fmt, residual, device="cpu", n=2, c=6, h=7, w=9, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(device, dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(k, c, 3, 3, generator=g) / 5).to(device, dtype).contiguous(memory_format=fmt)
    scale = (torch.rand(k, generator=g) + 0.5).to(device)
    shift = torch.randn(k, generator=g).to(device)
    r = torch.randn(n, k, h, w, generator=g).to(device, dtype).contiguous(memory_format=fmt) if residual else None
    return x, weight, scale, shift, r


GEOM = ([1, 1], [1, 1], [1, 1], 1)  # stride, padding, dilation, groups


def test_fold_bn_rounds_once_in_fp32_and_keeps_the_format():
    _, w, scale, shift, _ = _inputs(torch.bfloat16, torch.channels_last, False)
    wf, bf = _cudnn.fold_bn(w, scale, shift)
    assert wf.dtype == bf.dtype == torch.bfloat16
    assert wf.stride() == w.stride()
    torch.testing.assert_close(wf, (w.float() * scale.view(-1, 1, 1, 1)).to(torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(bf, shift.to(torch.bfloat16), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fold_bn_is_the_bn_of_the_conv(dtype):
    x, w, scale, shift, _ = _inputs(dtype, torch.contiguous_format, False)
    wf, bf = _cudnn.fold_bn(w, scale, shift)
    folded = F.conv2d(x, wf, bf, *GEOM)
    unfolded = F.conv2d(x, w, None, *GEOM) * scale.to(dtype).view(1, -1, 1, 1) + shift.to(dtype).view(1, -1, 1, 1)
    torch.testing.assert_close(folded, unfolded, **TOL[dtype])


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_fused_op_computes_relu_conv_bias(dtype, fmt, residual):
    """The op's CPU body is the fused graph's math: relu(conv(x, w') + b' (+ r)) in fp32, one rounding;
    the output's memory format follows F.conv2d."""
    x, w, scale, shift, r = _inputs(dtype, fmt, residual)
    wf, bf = _cudnn.fold_bn(w, scale, shift)
    y = _cudnn.conv_bias_relu(x, wf, bf, r, *GEOM)
    z = F.conv2d(x.double(), wf.double(), bf.double(), *GEOM) + (0 if r is None else r.double())
    torch.testing.assert_close(y, torch.relu(z).to(dtype), **TOL[dtype])
    assert y.stride() == F.conv2d(x, wf, bf, *GEOM).stride()


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
def test_fused_op_opcheck(fmt, residual):
    x, w, scale, shift, r = _inputs(torch.float32, fmt, residual)
    wf, bf = _cudnn.fold_bn(w, scale, shift)
    for t in (x, wf, bf) + ((r,) if r is not None else ()):
        t.requires_grad_(True)
    torch.library.opcheck(torch.ops.fastres.conv_bias_relu_cudnn, (x, wf, bf, r, *GEOM))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
def test_gradcheck_through_the_folding(residual):
    """Gradients reach weight, scale and shift through fold_bn and the fused op's autograd."""
    x, w, scale, shift, r = _inputs(torch.float64, torch.contiguous_format, residual, n=1, c=3, h=5, w=4, k=2)
    scale, shift = scale.double(), shift.double()
    args = [t.requires_grad_(True) for t in (x, w, scale, shift) + ((r,) if r is not None else ())]

    def f(x, w, scale, shift, *rest):
        wf, bf = _cudnn.fold_bn(w, scale, shift)
        return _cudnn.conv_bias_relu(x, wf, bf, rest[0] if rest else None, *GEOM)

    assert torch.autograd.gradcheck(f, args)


def test_relu_gradient_passes_nan_like_torch_relu():
    x, w, scale, shift, _ = _inputs(torch.float32, torch.contiguous_format, False, n=1)
    x[0, 0, 3, 3] = float("nan")
    wf, bf = _cudnn.fold_bn(w, scale, shift)
    mine, ref = (t.detach().clone().requires_grad_(True) for t in (x, x))
    _cudnn.conv_bias_relu(mine, wf, bf, None, *GEOM).sum().backward()
    torch.relu(F.conv2d(ref, wf, bf, *GEOM)).sum().backward()
    torch.testing.assert_close(mine.grad, ref.grad, equal_nan=True)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backend_function_matches_reference_on_cpu(dtype, act):
    """``_cudnn.conv_bn_act`` (what backend="cudnn" runs) on CPU tensors: the fused form for relu,
    conv + bn_act otherwise (fp64 always)."""
    x, w, scale, shift, r = _inputs(dtype, torch.channels_last, True)
    y = _cudnn_backend(x, w, scale, shift, r, *GEOM, act)
    ref = reference.conv_bn_act(x, w, scale, shift, r, *GEOM, act)
    torch.testing.assert_close(y, ref, **TOL[dtype])
    assert y.stride() == ref.stride()


def _bn_params(k, g):
    """Eval BN statistics of a trained ResNet's order of magnitude."""
    mean, var = torch.randn(k, generator=g) * 0.5, torch.rand(k, generator=g) * 2 + 0.05
    gamma, beta = torch.rand(k, generator=g) + 0.3, torch.randn(k, generator=g) * 0.3
    scale = gamma / torch.sqrt(var + 1e-5)
    return mean, var, gamma, beta, scale, beta - mean * scale


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_folding_keeps_the_accuracy_rule(dtype):
    """The issue's rule on one ResNet conv: against the fp32 model, the cudnn backend's error stays
    within 1.5x of the stock model's in ``dtype``. Both start from the model cast to ``dtype``
    (weight and BN parameters rounded); stock runs conv, BN and relu in ``dtype``; the cudnn backend
    folds the rounded weight with the fp32 scale (a second rounding of the weight) and adds the
    shift rounded to ``dtype``, in one fused call."""
    g = torch.Generator().manual_seed(0)
    k, c = 64, 64
    x32 = torch.randn(4, c, 14, 14, generator=g)
    w32 = torch.randn(k, c, 3, 3, generator=g) * (2 / (9 * c)) ** 0.5
    mean, var, gamma, beta, _, _ = _bn_params(k, g)
    bn64 = [t.double() for t in (mean, var, gamma, beta)]
    truth = torch.relu(F.batch_norm(F.conv2d(x32.double(), w32.double(), None, 1, 1), *bn64, eps=1e-5))
    x, w = x32.to(dtype), w32.to(dtype)
    bn = [t.to(dtype) for t in (mean, var, gamma, beta)]
    stock = torch.relu(F.batch_norm(F.conv2d(x, w, None, 1, 1), *bn, eps=1e-5))
    scale = gamma.to(dtype).float() / torch.sqrt(var.to(dtype).float() + 1e-5)  # ops.bn_scale_shift's formula
    shift = beta.to(dtype).float() - mean.to(dtype).float() * scale
    y = _cudnn_backend(x, w, scale, shift, None, [1, 1], [1, 1], [1, 1], 1, "relu")
    err = lambda y: (y.double() - truth).abs().max().item()  # noqa: E731
    assert err(y) <= 1.5 * err(stock), (err(y), err(stock))


def test_backend_name_validation():
    x, w, scale, shift, _ = _inputs(torch.float32, torch.contiguous_format, False)
    with pytest.raises(RuntimeError, match="backend 'cudnn' is unavailable: the cudnn backend needs CUDA tensors"):
        ops.conv_bn_act(x, w, scale, shift, padding=1, backend="cudnn")
    with pytest.raises(RuntimeError, match="backend 'cudnn' is unavailable"):
        ops.bn_act(x, torch.ones(6), torch.zeros(6), backend="cudnn")
    assert "cudnn" in backends.implemented_backends("conv_bn_act")
    assert "cudnn" not in backends.implemented_backends("bn_act")
    with torch.backends.cudnn.flags(enabled=False):
        assert "cuDNN is disabled" in backends.unavailable_reason("cudnn", torch.device("cuda"))


@requires_cuda
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cudnn_backend_on_gpu(dtype, residual, fmt, act):
    """Against the reference computed in fp32 from the same inputs: the folded weight is rounded once,
    so low precision gets the tolerance of one more rounding of the weight (twice TOL)."""
    x, w, scale, shift, r = _inputs(dtype, fmt, residual, device=DEVICE)
    y = ops.conv_bn_act(x, w, scale, shift, r, padding=1, activation=act, backend="cudnn")
    up = lambda t: None if t is None else t.float()  # noqa: E731
    with torch.backends.cudnn.flags(allow_tf32=False):
        ref = reference.conv_bn_act(up(x), up(w), scale, shift, up(r), *GEOM, act).to(dtype)
    tol = {k: 2 * v for k, v in TOL[dtype].items()} if dtype != torch.float32 else dict(rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(y, ref, **tol)
    assert y.stride() == F.conv2d(x, w, None, *GEOM).stride()


@requires_cuda
def test_cudnn_backend_trains_on_gpu():
    x, w, scale, shift, r = _inputs(torch.float32, torch.channels_last, True, device=DEVICE)
    args = [t.requires_grad_(True) for t in (x, w, scale, shift, r)]
    with torch.backends.cudnn.flags(allow_tf32=False):
        ops.conv_bn_act(*args, padding=1, backend="cudnn").sum().backward()
        got = [t.grad.clone() for t in args]
        for t in args:
            t.grad = None
        reference.conv_bn_act(*args, *GEOM, "relu").sum().backward()
    for a, t in zip(got, args):
        torch.testing.assert_close(a, t.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", ["no_grad", "grad", "inference_mode"])
def test_backend_function_under_torch_compile(mode):
    """The folding and the fused op trace into one graph (the op is opaque, with its fake kernel)."""
    x, w, scale, shift, r = _inputs(torch.float32, torch.channels_last, True)
    if mode == "grad":
        w.requires_grad_(True)
    f = torch.compile(lambda *a: _cudnn_backend(*a, *GEOM, "relu"), fullgraph=True, backend="aot_eager")
    ctx = {"no_grad": torch.no_grad, "grad": torch.enable_grad, "inference_mode": torch.inference_mode}[mode]
    with ctx():
        y = f(x, w, scale, shift, r)
    torch.testing.assert_close(y, reference.conv_bn_act(x, w, scale, shift, r, *GEOM, "relu"), **TOL[torch.float32])
    if mode == "grad":
        y.sum().backward()
        assert w.grad is not None
    torch._dynamo.reset()
