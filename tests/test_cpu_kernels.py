"""fastres's CPU kernels (csrc/cpu/bn_act.cpp): ``_bn_act_cpu`` is the reference bit for bit;
``_bn_act_train_backward_cpu`` is ReLU's backward + nn.BatchNorm2d's training backward, and
``_bn_stats_cpu`` nn.BatchNorm2d's batch statistics and running update, independent of the thread
count; the in-place forms (``_bn_act_cpu_``, ``_bn_act_train_backward_cpu_``) give the same bits;
all check their arguments and pass opcheck."""
import pytest
import torch

from fastres import _cpu_bn, _extension, reference
from conftest import FORMATS, TOL

pytestmark = pytest.mark.skipif(not _extension.has_cpu_kernels(), reason="fastres._C's CPU kernels are not loaded")

DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# odd shapes, a 1x1 map, one channel, and one large enough for several parallel tasks and blocks
SHAPES = [(1, 3, 7, 9), (2, 5, 7, 9), (3, 16, 1, 1), (2, 1, 4, 3), (2, 64, 33, 35)]


def _x(shape, dtype, fmt, scale=2.0):
    return (torch.randn(shape) * scale).to(dtype).contiguous(memory_format=FORMATS[fmt])


def _vec(c, dtype, positive=False):
    ct = reference.compute_dtype(dtype)
    return torch.rand(c, dtype=ct) + 0.5 if positive else torch.randn(c, dtype=ct)


def _same(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0), want.nan_to_num(0))


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["relu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_bn_act_is_the_reference_bit_for_bit(shape, fmt, dtype, act, with_residual):
    torch.manual_seed(0)
    x = _x(shape, dtype, fmt)
    x[0, 0, 0, 0] = float("nan")  # NaN propagates through ReLU, as torch.relu
    r = _x(shape, dtype, fmt) if with_residual else None
    scale, shift = _vec(shape[1], dtype), _vec(shape[1], dtype)
    assert _cpu_bn.native_reason(x, scale.dtype, r, act) is None
    _same(_cpu_bn.bn_act_native(x, scale, shift, r, act), reference.bn_act(x, scale, shift, r, act))


@pytest.mark.parametrize("shape", SHAPES + [(2, 64, 112, 113)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["relu", "identity"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_bn_act_in_place_is_the_same(shape, fmt, dtype, act, with_residual):
    """Written over x (``reuse_x``): the out-of-place kernel's bits, in x's storage (a ResNet
    stem's 64 channels over many channels_last rows included)."""
    torch.manual_seed(0)
    x = _x(shape, dtype, fmt)
    r = _x(shape, dtype, fmt) if with_residual else None
    scale, shift = _vec(shape[1], dtype), _vec(shape[1], dtype)
    want = _cpu_bn.bn_act_native(x, scale, shift, r, act)
    ptr = x.data_ptr()
    got = _cpu_bn.bn_act_native(x, scale, shift, r, act, reuse_x=True)
    assert got.data_ptr() == ptr
    _same(got, want)


def _expected_backward(grad, x, out, scale, shift, mean, invstd, act):
    """threshold_backward on the output, then native_batch_norm_backward in training mode."""
    if out is None:
        out = reference.bn_act(x, scale, shift, None, act)
    gz = torch.ops.aten.threshold_backward(grad, out, 0) if act == "relu" else grad
    weight = scale / invstd
    gx, gw, gb = torch.ops.aten.native_batch_norm_backward(gz, x, weight, None, None, mean, invstd, True, 1e-5,
                                                           [True, True, True])
    return gx, gw, gb, gz


def _batch(shape, dtype, fmt, with_residual):
    x, grad = _x(shape, dtype, fmt), _x(shape, dtype, fmt)
    ct = reference.compute_dtype(dtype)
    var, mean = torch.var_mean(x.to(ct), (0, 2, 3), correction=0)
    invstd = torch.rsqrt(var + 1e-5)
    scale = invstd * _vec(shape[1], dtype, positive=True)
    shift = _vec(shape[1], dtype) - mean * scale
    r = _x(shape, dtype, fmt) if with_residual else None
    return x, grad, r, scale, shift, mean, invstd


_GRAD_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-12, atol=1e-12),
             torch.bfloat16: TOL[torch.bfloat16]}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("act", ["relu", "identity"])
@pytest.mark.parametrize("mask", ["recomputed", "from-output", "residual"])
def test_train_backward_is_relu_then_batchnorm_backward(shape, fmt, dtype, act, mask):
    """ReLU's mask recomputed from x (no residual), read from the kept output, or a residual
    unit's (output given, gz returned); the sums in fp64 over fixed blocks (bf16: gz and grad_x
    round once)."""
    torch.manual_seed(0)
    x, grad, r, scale, shift, mean, invstd = _batch(shape, dtype, fmt, mask == "residual")
    out = None if mask == "recomputed" else reference.bn_act(x, scale, shift, r, act)
    gx, gw, gb, gz = torch.ops.fastres._bn_act_train_backward_cpu(grad, x, out, scale, shift, mean, invstd, act,
                                                                  mask == "residual")
    ex = _expected_backward(grad, x, out, scale, shift, mean, invstd, act)
    assert gx.dtype == dtype and gx.stride() == x.stride()
    torch.testing.assert_close(gx, ex[0], **_GRAD_TOL[dtype])
    # ATen sums in fp32 in another order: the weight and bias gradients agree to fp32 sums' error
    sums = _GRAD_TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gw, ex[1], **sums)
    torch.testing.assert_close(gb, ex[2], **sums)
    if mask == "residual":
        assert torch.equal(gz, ex[3])
    else:
        assert gz.numel() == 0


@pytest.mark.parametrize("shape", [(1, 3, 7, 9), (2, 64, 33, 35)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["recomputed", "from-output", "residual", "identity"])
@pytest.mark.parametrize("reuse", ["grad", "x"])
def test_train_backward_in_place_is_the_same(shape, fmt, dtype, mask, reuse):
    """grad_x written over grad or over x: the out-of-place kernel's bits, in that storage."""
    torch.manual_seed(0)
    x, grad, r, scale, shift, mean, invstd = _batch(shape, dtype, fmt, mask == "residual")
    act = "identity" if mask == "identity" else "relu"
    out = reference.bn_act(x, scale, shift, r, act) if mask in ("from-output", "residual") else None
    args = (out, scale, shift, mean, invstd, act, mask == "residual")
    want = torch.ops.fastres._bn_act_train_backward_cpu(grad, x, *args)
    ptr = (grad if reuse == "grad" else x).data_ptr()
    got = _cpu_bn.bn_act_train_backward(grad, x, *args, reuse=reuse)
    assert got[0].data_ptr() == ptr
    for a, b in zip(got, want):
        _same(a, b)


def test_train_backward_over_x_takes_a_grad_of_another_layout():
    torch.manual_seed(0)
    x, grad, _, scale, shift, mean, invstd = _batch((2, 6, 5, 7), torch.float32, "nhwc", False)
    args = (None, scale, shift, mean, invstd, "relu", False)
    want = torch.ops.fastres._bn_act_train_backward_cpu(grad, x, *args)
    got = _cpu_bn.bn_act_train_backward(grad.contiguous(), x, *args, reuse="x")
    for a, b in zip(got, want):
        _same(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_train_backward_mask_recomputed_is_the_outputs(fmt, dtype):
    """The recomputed ReLU mask is that of the forward's rounded output: the same gradients as
    with the output given, bit for bit."""
    torch.manual_seed(0)
    x, grad, _, scale, shift, mean, invstd = _batch((2, 8, 9, 7), dtype, fmt, False)
    out = _cpu_bn.bn_act_native(x, scale, shift, None, "relu")
    got = torch.ops.fastres._bn_act_train_backward_cpu(grad, x, None, scale, shift, mean, invstd, "relu", False)
    given = torch.ops.fastres._bn_act_train_backward_cpu(grad, x, out, scale, shift, mean, invstd, "relu", False)
    for a, b in zip(got, given):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", FORMATS)
def test_train_backward_does_not_depend_on_the_thread_count(fmt):
    torch.manual_seed(0)
    x, grad, _, scale, shift, mean, invstd = _batch((4, 64, 30, 31), torch.float32, fmt, False)
    args = (grad, x, None, scale, shift, mean, invstd, "relu", False)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastres._bn_act_train_backward_cpu(*args)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, torch.ops.fastres._bn_act_train_backward_cpu(*args)):
        assert torch.equal(a, b)


def test_train_backward_takes_a_grad_of_another_layout():
    torch.manual_seed(0)
    x, grad, _, scale, shift, mean, invstd = _batch((2, 6, 5, 7), torch.float32, "nhwc", False)
    got = torch.ops.fastres._bn_act_train_backward_cpu(grad.contiguous(), x, None, scale, shift, mean, invstd,
                                                       "relu", False)
    want = torch.ops.fastres._bn_act_train_backward_cpu(grad, x, None, scale, shift, mean, invstd, "relu", False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    assert got[0].stride() == x.stride()


@pytest.mark.parametrize("shape", SHAPES + [(9, 3, 130, 140)], ids=str)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_batch_stats_and_running_update(shape, fmt, dtype):
    """The mean and biased variance to the compute dtype's rounding of the exact (fp64) ones, off
    the origin (x ~ 5 + 3 N(0, 1)); the running buffers updated as nn.BatchNorm2d does."""
    torch.manual_seed(0)
    x = (torch.randn(shape) * 3 + 5).to(dtype).contiguous(memory_format=FORMATS[fmt])
    ct = reference.compute_dtype(dtype)
    rm, rv = torch.randn(shape[1], dtype=ct), torch.rand(shape[1], dtype=ct)
    want_rm, want_rv = rm.double(), rv.double()
    want_mean, want_var = torch.batch_norm_update_stats(x.double(), want_rm, want_rv, 0.1)
    mean, var = torch.ops.fastres._bn_stats_cpu(x, rm, rv, 0.1)
    tol = _GRAD_TOL[torch.float64] if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    for got, want in ((mean, want_mean), (var, want_var), (rm, want_rm), (rv, want_rv)):
        assert got.dtype == ct
        torch.testing.assert_close(got, want.to(ct), **tol)
    alone = torch.ops.fastres._bn_stats_cpu(x, None, None, 0.1)
    assert torch.equal(alone[0], mean) and torch.equal(alone[1], var)


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_stats_do_not_depend_on_the_thread_count(fmt):
    x = (torch.randn(4, 64, 30, 31) + 3).contiguous(memory_format=FORMATS[fmt])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = torch.ops.fastres._bn_stats_cpu(x, None, None, 0.1)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, torch.ops.fastres._bn_stats_cpu(x, None, None, 0.1)):
        assert torch.equal(a, b)


def test_bad_input_names_the_argument():
    x = torch.randn(2, 3, 4, 5)
    s, b = torch.ones(3), torch.zeros(3)
    op = torch.ops.fastres._bn_act_cpu
    with pytest.raises(RuntimeError, match="x: expected float32, float64 or bfloat16"):
        op(x.half(), s, b, None, "relu")
    with pytest.raises(RuntimeError, match="activation: expected"):
        op(x, s, b, None, "silu")
    with pytest.raises(RuntimeError, match="scale: expected a contiguous float32 vector of length C = 3"):
        op(x, torch.ones(4), b, None, "relu")
    with pytest.raises(RuntimeError, match="residual: expected"):
        op(x, s, b, x.contiguous(memory_format=torch.channels_last), "relu")
    with pytest.raises(RuntimeError, match="x: expected a 4-D"):
        op(x[..., ::2], s, b, None, "relu")
    bwd = torch.ops.fastres._bn_act_train_backward_cpu
    with pytest.raises(RuntimeError, match="grad: expected"):
        bwd(x[:1], x, None, s, b, b, s, "relu", False)
    with pytest.raises(RuntimeError, match="invstd: expected"):
        bwd(x, x, None, s, b, b, s.double(), "relu", False)
    bwd_ = torch.ops.fastres._bn_act_train_backward_cpu_
    with pytest.raises(RuntimeError, match="grad: expected a CPU tensor of x's dtype, shape and strides"):
        bwd_(x.contiguous(memory_format=torch.channels_last), x.clone(), None, s, b, b, s, "relu", False, False)
    y = x.clone()
    with pytest.raises(RuntimeError, match="out: expected a tensor other than x"):
        bwd_(x.clone(), y, y, s, b, b, s, "relu", False, True)
    with pytest.raises(RuntimeError, match="x: expected float32, float64 or bfloat16"):
        torch.ops.fastres._bn_act_cpu_(x.half(), s, b, None, "relu")
    stats = torch.ops.fastres._bn_stats_cpu
    with pytest.raises(RuntimeError, match="running_mean, running_var: expected both or neither"):
        stats(x, s.clone(), None, 0.1)
    with pytest.raises(RuntimeError, match="running_var: expected a contiguous float32 vector"):
        stats(x, s.clone(), torch.ones(2), 0.1)
    with pytest.raises(RuntimeError, match="more than 1 value per channel"):
        stats(x[:1, :, :1, :1].contiguous(), s.clone(), s.clone(), 0.1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    torch.manual_seed(0)
    x, grad, r, scale, shift, mean, invstd = _batch((2, 3, 4, 5), torch.float32, fmt, True)
    torch.library.opcheck(torch.ops.fastres._bn_act_cpu, (x, scale, shift, r, "relu"))
    torch.library.opcheck(torch.ops.fastres._bn_act_cpu, (x, scale, shift, None, "identity"))
    bwd = torch.ops.fastres._bn_act_train_backward_cpu
    torch.library.opcheck(bwd, (grad, x, None, scale, shift, mean, invstd, "relu", False))
    torch.library.opcheck(bwd, (grad, x, x.relu(), scale, shift, mean, invstd, "relu", True))
    torch.library.opcheck(torch.ops.fastres._bn_act_cpu_, (x.clone(), scale, shift, r, "relu"))
    bwd_ = torch.ops.fastres._bn_act_train_backward_cpu_
    for over_x in (False, True):
        torch.library.opcheck(bwd_, (grad.clone(), x.clone(), None, scale, shift, mean, invstd, "relu", False,
                                     over_x))
        torch.library.opcheck(bwd_, (grad.clone(), x.clone(), x.relu(), scale, shift, mean, invstd, "relu", True,
                                     over_x))
    stats = torch.ops.fastres._bn_stats_cpu
    torch.library.opcheck(stats, (x, torch.zeros(3), torch.ones(3), 0.1))
    torch.library.opcheck(stats, (x, None, None, 0.1))
