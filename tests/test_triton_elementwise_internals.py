"""Kernel-internal edge cases of fastres/triton/elementwise.py.

The cross-backend behaviour is tested in test_elementwise.py; here the tile
and partition constants are shrunk so that small tensors exercise what only
large ones would otherwise reach: several channel blocks, several pixel tiles
per image, several tiles per backward program and a ragged last program.
"""
import pytest
import torch

from conftest import DEVICE, TOL
from fastres import _layout, backends, ops, reference

_REASON = backends.unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))

if _REASON is None:
    from fastres.triton import elementwise as ew

FORMATS = {"nchw": torch.contiguous_format, "nhwc": torch.channels_last}


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Tiles of at most 16 elements and 8 columns; about 5 backward programs per call,
    so each loops over several tiles and the last one gets fewer (a ragged partition)."""
    monkeypatch.setattr(ew, "_TILE", 16)
    monkeypatch.setattr(ew, "_TILE_BWD", 16)
    monkeypatch.setattr(ew, "_BLOCK_K_MAX", 8)
    monkeypatch.setattr(ew, "_BLOCK_K_MIN", 2)
    monkeypatch.setattr(ew, "_BLOCK_1D", 16)
    monkeypatch.setattr(ew, "_BWD_PROGRAMS", 5)


def _x(shape, dtype, fmt="nchw"):
    return (torch.randn(shape, device=DEVICE) * 2).to(dtype).contiguous(memory_format=FORMATS[fmt])


def _bn_inputs(shape, dtype, fmt, with_residual, vec_dtype=torch.float32):
    x, g = _x(shape, dtype, fmt), _x(shape, dtype, fmt)
    c = shape[1]
    scale = torch.rand(c, device=DEVICE, dtype=vec_dtype) + 0.5
    shift = torch.randn(c, device=DEVICE, dtype=vec_dtype)
    r = _x(shape, dtype, fmt) if with_residual else None
    return g, x, scale, shift, r


def _reference_backward(g, x, scale, shift, r, act):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, scale, shift, r)]
    reference.bn_act(*leaves, act).backward(g)
    return [t.grad if t is not None else None for t in leaves]


def _check_bn_backward(g, x, scale, shift, r, act, sum_tol=None):
    gx, gz, gs, gb, _ = torch.ops.fastres.bn_act_backward_triton(g, x, scale, shift, r, act, r is not None)
    want_x, want_s, want_b, want_r = _reference_backward(g, x, scale, shift, r, act)
    tol = TOL[x.dtype]
    sum_tol = sum_tol or (tol if x.dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4))
    assert gx.stride() == _layout.dense(x).stride() and gx.dtype == x.dtype
    torch.testing.assert_close(gx, want_x, **tol)
    if r is None:
        assert gz.numel() == 0
    else:
        torch.testing.assert_close(gz, want_r, **tol)
    assert gs.dtype == scale.dtype and gb.dtype == shift.dtype
    torch.testing.assert_close(gs, want_s, **sum_tol)
    torch.testing.assert_close(gb, want_b, **sum_tol)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(3, 11, 5, 7), (2, 3, 1, 1), (5, 1, 3, 3), (1, 20, 2, 9)], ids=str)
@pytest.mark.parametrize("act", ["relu", "silu", "identity"])
def test_many_tiles_and_ragged_partition(tiny_tiles, fmt, shape, act):
    g, x, scale, shift, r = _bn_inputs(shape, torch.float32, fmt, with_residual=True)
    y = torch.ops.fastres.bn_act_triton(x, scale, shift, r, act)
    torch.testing.assert_close(y, reference.bn_act(x, scale, shift, r, act), **TOL[torch.float32])
    y = torch.ops.fastres.add_act_triton(x, r, act)
    torch.testing.assert_close(y, reference.add_act(x, r, act), **TOL[torch.float32])
    _check_bn_backward(g, x, scale, shift, r, act)
    _check_bn_backward(g, x, scale, shift, None, act)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", [(4, 70, 3, 5), (2, 3, 40, 60), (1, 300, 2, 2)], ids=str)
def test_default_tiles_several_blocks(fmt, shape):
    """With the real constants: C > 256 (two channel blocks), H*W over one pixel tile."""
    g, x, scale, shift, r = _bn_inputs(shape, torch.float16, fmt, with_residual=True)
    torch.testing.assert_close(
        torch.ops.fastres.bn_act_triton(x, scale, shift, r, "silu"),
        reference.bn_act(x, scale, shift, r, "silu"),
        **TOL[torch.float16],
    )
    _check_bn_backward(g, x, scale, shift, r, "silu")


@pytest.mark.parametrize("fmt", FORMATS)
def test_fp64_is_computed_in_fp64(fmt):
    """A 1e-12 relative change, invisible in fp32, survives: no downcast anywhere."""
    x = torch.full((1, 2, 3, 3), 1.0, dtype=torch.float64, device=DEVICE).contiguous(memory_format=FORMATS[fmt])
    scale = torch.full((2,), 1.0 + 1e-12, dtype=torch.float64, device=DEVICE)
    shift = torch.full((2,), -1.0, dtype=torch.float64, device=DEVICE)
    y = torch.ops.fastres.bn_act_triton(x, scale, shift, None, "identity")
    torch.testing.assert_close(y, torch.full_like(x, 1e-12), rtol=1e-4, atol=0)
    r = torch.full_like(x, -1.0)
    y = torch.ops.fastres.add_act_triton(x * scale[0], r, "silu")
    torch.testing.assert_close(y, reference.add_act(x * scale[0], r, "silu"), rtol=1e-10, atol=0)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("vec_dtype", [torch.float64, torch.float32])
def test_fp64_backward_and_mixed_vector_dtype(tiny_tiles, fmt, vec_dtype):
    g, x, scale, shift, r = _bn_inputs((2, 5, 3, 4), torch.float64, fmt, True, vec_dtype)
    # grad_scale/grad_shift come back in the vectors' dtype: fp32 vectors get fp32 sums.
    sum_tol = dict(rtol=1e-6, atol=1e-6) if vec_dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    _check_bn_backward(g, x, scale, shift, r, "silu", sum_tol=sum_tol)


def test_gradcheck_through_public_api(tiny_tiles):
    def leaf(*shape):
        return torch.randn(*shape, dtype=torch.float64, device=DEVICE, requires_grad=True)

    x = leaf(2, 3, 3, 5).contiguous(memory_format=torch.channels_last).detach().requires_grad_()
    r, scale, shift = leaf(2, 3, 3, 5), leaf(3), leaf(3)
    assert torch.autograd.gradcheck(lambda *a: ops.bn_act(*a, "silu", backend="triton"), (x, scale, shift, r))
    assert torch.autograd.gradcheck(lambda *a: ops.bn_act(*a, None, "silu", backend="triton"), (x, scale, shift))
    assert torch.autograd.gradcheck(lambda a, b: ops.add_act(a, b, "silu", backend="triton"), (x, r))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_relu_nan_backward_passes_gradient(dtype):
    """relu backward is threshold_backward on the output: NaN > 0 is false, but NaN <= 0 too."""
    g, x, scale, shift, r = _bn_inputs((1, 3, 2, 3), dtype, "nhwc", with_residual=True)
    x[0, 1, 0, 2] = float("nan")
    r[0, 2, 1, 0] = float("nan")
    gx, gz, gs, gb, _ = torch.ops.fastres.bn_act_backward_triton(g, x, scale, shift, r, "relu", True)
    want_x, want_s, want_b, want_r = _reference_backward(g, x, scale, shift, r, "relu")
    torch.testing.assert_close(gx, want_x, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(gz, want_r, equal_nan=True, **TOL[dtype])
    torch.testing.assert_close(gs, want_s, equal_nan=True, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gb, want_b, equal_nan=True, rtol=1e-4, atol=1e-4)
    gz = torch.ops.fastres.add_act_backward_triton(g, x, r, "relu")
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    reference.add_act(xl, rl, "relu").backward(g)
    torch.testing.assert_close(gz, xl.grad, equal_nan=True, **TOL[dtype])


def test_mixed_strides_and_odd_vectors():
    """grad expanded (stride 0), residual in the other format, scale/shift with stride 2."""
    x = _x((2, 4, 3, 5), torch.float32, "nhwc")
    g = torch.randn(1, 4, 1, 1, device=DEVICE).expand(2, 4, 3, 5)
    r = _x((2, 4, 3, 5), torch.float32, "nchw")
    scale = (torch.rand(8, device=DEVICE) + 0.5)[::2]
    shift = torch.randn(8, device=DEVICE)[1::2]
    _check_bn_backward(g, x, scale, shift, r, "silu")
    gz = torch.ops.fastres.add_act_backward_triton(g, x, r, "silu")
    xl, rl = x.clone().requires_grad_(), r.clone().requires_grad_()
    reference.add_act(xl, rl, "silu").backward(g)
    assert gz.stride() == x.stride()
    torch.testing.assert_close(gz, xl.grad)
    torch.testing.assert_close(
        torch.ops.fastres.bn_act_triton(x, scale, shift, r, "relu"), reference.bn_act(x, scale, shift, r, "relu")
    )


def test_empty_backward():
    x = torch.empty(0, 4, 3, 3, device=DEVICE)
    scale, shift = torch.ones(4, device=DEVICE), torch.ones(4, device=DEVICE)
    gx, gz, gs, gb, _ = torch.ops.fastres.bn_act_backward_triton(x, x, scale, shift, x, "silu", True)
    assert gx.shape == gz.shape == x.shape
    assert torch.equal(gs, torch.zeros(4, device=DEVICE)) and torch.equal(gb, torch.zeros(4, device=DEVICE))
    assert torch.ops.fastres.add_act_backward_triton(x, x, x, "relu").shape == x.shape


def test_deterministic(tiny_tiles):
    g, x, scale, shift, r = _bn_inputs((3, 7, 5, 6), torch.float32, "nhwc", True)
    first = torch.ops.fastres.bn_act_backward_triton(g, x, scale, shift, r, "silu", True)
    second = torch.ops.fastres.bn_act_backward_triton(g, x, scale, shift, r, "silu", True)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck_all_ops(fmt):
    g, x, scale, shift, r = _bn_inputs((2, 3, 4, 5), torch.float64, fmt, True, torch.float64)
    torch.library.opcheck(torch.ops.fastres.add_act_triton, (x, r, "relu"))
    torch.library.opcheck(torch.ops.fastres.add_act_backward_triton, (g, x, r, "identity"))
    torch.library.opcheck(torch.ops.fastres.bn_act_triton, (x, scale, shift, None, "silu"))
    torch.library.opcheck(torch.ops.fastres.bn_act_backward_triton, (g, x, scale, shift, r, "silu", True))
    torch.library.opcheck(torch.ops.fastres.bn_act_backward_triton, (g, x, scale, shift, None, "identity", False))


def test_block_k_choice():
    # Padding minimized, widest on ties, within [_BLOCK_K_MIN, _BLOCK_K_MAX] unless K is smaller.
    assert [ew._block_k(k) for k in (1, 3, 9, 49, 64, 196, 784, 3136, 12544, 2048)] == [
        1, 4, 16, 64, 64, 32, 32, 64, 256, 256
    ]
