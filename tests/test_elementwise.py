"""add_act and bn_act: every backend against the plain PyTorch reference,
forward and backward, over dtypes, memory formats, odd shapes and activations."""
import pytest
import torch

import fastres
from fastres import ops, reference
from conftest import ACTIVATIONS, DEVICE, DTYPES, FORMATS, TOL, all_backends, kernel_backends

SHAPES = [(1, 3, 7, 9), (2, 8, 7, 9), (3, 16, 1, 1), (1, 1, 4, 3), (2, 24, 5, 6)]


def _x(shape, dtype, fmt="nchw", scale=2.0):
    t = (torch.randn(shape, device=DEVICE) * scale).to(dtype)
    return t.contiguous(memory_format=FORMATS[fmt])


def _scale_shift(c, dtype=torch.float32):
    return (torch.rand(c, device=DEVICE, dtype=dtype) + 0.5, torch.randn(c, device=DEVICE, dtype=dtype))


def _assert_same(out, ref):
    assert out.dtype == ref.dtype
    assert out.shape == ref.shape
    assert out.stride() == ref.stride(), "output memory format must follow PyTorch's"
    torch.testing.assert_close(out, ref, **TOL[ref.dtype])


@pytest.mark.parametrize("backend", all_backends("add_act"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_add_act_forward(backend, shape, fmt, dtype, act):
    x, r = _x(shape, dtype, fmt), _x(shape, dtype, fmt)
    _assert_same(ops.add_act(x, r, act, backend=backend), reference.add_act(x, r, act))


@pytest.mark.parametrize("backend", all_backends("bn_act"))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_bn_act_forward(backend, shape, fmt, dtype, act, with_residual):
    x = _x(shape, dtype, fmt)
    scale, shift = _scale_shift(shape[1])
    r = _x(shape, dtype, fmt) if with_residual else None
    _assert_same(ops.bn_act(x, scale, shift, r, act, backend=backend), reference.bn_act(x, scale, shift, r, act))


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() if t is not None else None for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out, [t.grad if t is not None else None for t in inputs]


@pytest.mark.parametrize("backend", kernel_backends("add_act"))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_add_act_backward(backend, fmt, dtype, act):
    shape = (2, 5, 7, 9)
    x, r, g = _x(shape, dtype, fmt), _x(shape, dtype, fmt), _x(shape, dtype, fmt)
    out, grads = _grads(lambda a, b: ops.add_act(a, b, act, backend=backend), [x, r], g)
    ref, ref_grads = _grads(lambda a, b: reference.add_act(a, b, act), [x, r], g)
    _assert_same(out, ref)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, **TOL[dtype])


@pytest.mark.parametrize("backend", all_backends("bn_act"))
@pytest.mark.parametrize("shape", [(2, 5, 7, 9), (1, 3, 1, 1), (4, 16, 3, 3)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_bn_act_backward(backend, shape, fmt, dtype, act, with_residual):
    x, g = _x(shape, dtype, fmt), _x(shape, dtype, fmt)
    scale, shift = _scale_shift(shape[1])
    r = _x(shape, dtype, fmt) if with_residual else None
    inputs = [x, scale, shift, r]
    out, grads = _grads(lambda *a: ops.bn_act(*a, act, backend=backend), inputs, g)
    ref, ref_grads = _grads(lambda *a: reference.bn_act(*a, act), inputs, g)
    _assert_same(out, ref)
    for name, got, want in zip(["x", "scale", "shift", "residual"], grads, ref_grads):
        if want is None:
            assert got is None
            continue
        # scale/shift gradients are fp32 sums over N*H*W products of rounded values.
        tol = TOL[dtype] if name in ("x", "residual") else dict(rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got, want, **tol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
def test_bn_act_backward_partial_needs(backend):
    """Only the inputs that require grad get one; residual without grad skips grad_z."""
    x, g = _x((2, 4, 3, 3), torch.float32), _x((2, 4, 3, 3), torch.float32)
    scale, shift = _scale_shift(4)
    r = _x((2, 4, 3, 3), torch.float32)
    xr = x.clone().requires_grad_()
    ops.bn_act(xr, scale, shift, r, backend=backend).backward(g)
    ref = x.clone().requires_grad_()
    reference.bn_act(ref, scale, shift, r, "relu").backward(g)
    torch.testing.assert_close(xr.grad, ref.grad)


@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_gradcheck_fp64(backend, act):
    def inputs(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)

    x, r = inputs(2, 3, 3, 4), inputs(2, 3, 3, 4)
    scale, shift = inputs(3), inputs(3)
    if act == "relu":  # keep z away from the kink, where finite differences are meaningless
        with torch.no_grad():
            x.copy_(x.sign() * (x.abs() + 0.1))
            r.zero_()
            shift.zero_()
            scale.copy_(scale.abs() + 0.1)
    assert torch.autograd.gradcheck(lambda a, b: ops.add_act(a, b, act, backend=backend), (x, r))
    assert torch.autograd.gradcheck(
        lambda *a: ops.bn_act(*a, act, backend=backend), (x, scale, shift, r)
    )


def _kernel_ops(backend):
    return getattr(torch.ops.fastres, f"add_act_{backend}"), getattr(torch.ops.fastres, f"bn_act_{backend}")


@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(backend, fmt, requires_grad):
    add_act, bn_act = _kernel_ops(backend)
    x, r = _x((2, 3, 4, 5), torch.float32, fmt), _x((2, 3, 4, 5), torch.float32, fmt)
    scale, shift = _scale_shift(3)
    for t in (x, r, scale, shift):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(add_act, (x, r, "silu"))
    torch.library.opcheck(bn_act, (x, scale, shift, r, "relu"))
    torch.library.opcheck(bn_act, (x, scale, shift, None, "identity"))


@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
def test_opcheck_backward_ops(backend):
    x, r, g = (_x((2, 3, 4, 5), torch.float32, "nhwc") for _ in range(3))
    scale, shift = _scale_shift(3)
    torch.library.opcheck(getattr(torch.ops.fastres, f"add_act_backward_{backend}"), (g, x, r, "silu"))
    bwd = getattr(torch.ops.fastres, f"bn_act_backward_{backend}")
    torch.library.opcheck(bwd, (g, x, scale, shift, r, "relu", True))
    torch.library.opcheck(bwd, (g, x, scale, shift, None, "silu", False))


@pytest.mark.parametrize("layout", ["sliced", "permuted", "channels_last_1x1"])
@pytest.mark.parametrize("act", ACTIVATIONS)
def test_bn_act_torch_backend_any_strides(layout, act):
    """The "torch" backend (BatchNorm's CPU kernels for NCHW/NHWC) gives the reference's
    values and strides, forward and backward, for inputs of any strides."""
    x = {
        "sliced": torch.randn(2, 4, 10, 12, device=DEVICE)[:, :, ::2, 1:],
        "permuted": torch.randn(2, 4, 5, 6, device=DEVICE).permute(0, 1, 3, 2),
        "channels_last_1x1": torch.randn(3, 4, 1, 1, device=DEVICE).contiguous(memory_format=torch.channels_last),
    }[layout]
    scale, shift = _scale_shift(4)
    _assert_same(ops.bn_act(x, scale, shift, None, act, backend="torch"), reference.bn_act(x, scale, shift, None, act))
    g = torch.randn_like(x)
    got = ops.bn_act_backward(g, x, scale, shift, None, act, False, True, backend="torch")
    want = reference.bn_act_backward(g, x, scale, shift, None, act, False, True)
    for a, b in zip(got, want):
        if b.dim() == 4:
            _assert_same(a, b)
        else:  # grad_scale, grad_shift: sums
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", all_backends("bn_act"))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_nan_propagates_like_torch_relu(backend, dtype):
    x = _x((1, 3, 2, 2), dtype)
    x[0, 1, 0, 0] = float("nan")
    x[0, 2, 1, 1] = float("-inf")
    ones, zeros = torch.ones(3, device=DEVICE), torch.zeros(3, device=DEVICE)
    out = ops.bn_act(x, ones, zeros, None, "relu", backend=backend)
    torch.testing.assert_close(out, torch.relu(x), equal_nan=True, rtol=0, atol=0)
    out = ops.add_act(x, torch.zeros_like(x), "relu", backend=backend)
    torch.testing.assert_close(out, torch.relu(x), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("backend", all_backends("bn_act"))
def test_mixed_and_non_dense_layouts(backend):
    """A residual in another memory format, and a non-dense (sliced) x, give the reference result."""
    x = _x((2, 6, 5, 8), torch.float32, "nhwc")[:, :, :, ::2]
    r = _x((2, 6, 5, 4), torch.float32, "nchw")
    scale, shift = _scale_shift(6)
    torch.testing.assert_close(
        ops.bn_act(x, scale, shift, r, "silu", backend=backend), reference.bn_act(x, scale, shift, r, "silu")
    )
    torch.testing.assert_close(ops.add_act(x, r, "relu", backend=backend), reference.add_act(x, r, "relu"))
    y = _x((2, 6, 5, 4), torch.float32, "nhwc")
    assert ops.add_act(y, r, backend=backend).is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("backend", all_backends("bn_act"))
def test_empty_batch(backend):
    x = torch.empty(0, 4, 3, 3, device=DEVICE)
    scale, shift = _scale_shift(4)
    assert ops.bn_act(x, scale, shift, x, backend=backend).shape == x.shape
    assert ops.add_act(x, x, backend=backend).shape == x.shape


@pytest.mark.parametrize("backend", all_backends("add_act"))
def test_add_act_any_rank(backend):
    x, r = torch.randn(5, 7, device=DEVICE), torch.randn(5, 7, device=DEVICE)
    torch.testing.assert_close(ops.add_act(x, r, "silu", backend=backend), reference.add_act(x, r, "silu"))


@pytest.mark.skipif(DEVICE.type != "cuda", reason="needs a GPU with > 13 GB free")
@pytest.mark.parametrize("backend", kernel_backends("bn_act"))
def test_over_2_pow_31_elements(backend):
    """64-bit indexing: 2^31 + 2^20 elements, the tail checked against the reference."""
    n = 2**31 + 2**20
    x = torch.randn(n // 64 // 16, 64, 4, 4, device=DEVICE, dtype=torch.float16)
    assert x.numel() > 2**31
    scale, shift = _scale_shift(64)
    out = ops.bn_act(x, scale, shift, None, "relu", backend=backend)
    tail = slice(x.shape[0] - 4, None)
    torch.testing.assert_close(out[tail], reference.bn_act(x[tail], scale, shift, None, "relu"), **TOL[torch.float16])
    del out
    out = ops.add_act(x, x, "relu", backend=backend)
    torch.testing.assert_close(out[tail], reference.add_act(x[tail], x[tail], "relu"), **TOL[torch.float16])


def test_compile_fullgraph():
    """The ops trace under torch.compile without graph breaks (the default backend here)."""
    x, r = _x((2, 4, 3, 3), torch.float32), _x((2, 4, 3, 3), torch.float32)
    scale, shift = _scale_shift(4)

    def f(x, r):
        return fastres.ops.add_act(fastres.ops.bn_act(x, scale, shift, r, "silu"), r)

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(x, r), f(x, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("act", ["relu", "identity"])
@pytest.mark.parametrize("block", [None, 16], ids=["one-block", "blocks"])
def test_cpu_bn_act_residual_is_the_reference_bit_for_bit(dtype, fmt, act, block, monkeypatch):
    """fastres._cpu_bn.bn_act_residual (the CPU bf16/fp16 residual epilogue) rounds as the reference,
    in one block of rows or in several with a partial last one."""
    from fastres import _cpu_bn

    if block is not None:
        monkeypatch.setattr(_cpu_bn, "_BLOCK", block)
    torch.manual_seed(0)
    x, r = ((torch.randn(2, 5, 7, 9) * 3).to(dtype).contiguous(memory_format=fmt) for _ in range(2))
    x[0, 1, 2, 3] = float("nan")
    scale, shift = torch.rand(5) + 0.5, torch.randn(5)
    assert _cpu_bn.residual_unsupported_reason(x, scale, shift, r, act) is None
    got = _cpu_bn.bn_act_residual(x, scale, shift, r, act)
    want = reference.bn_act(x, scale, shift, r, act)
    assert got.dtype == dtype and got.stride() == want.stride()
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.nan_to_num(0), want.nan_to_num(0))
