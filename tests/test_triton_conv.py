"""The fused conv-BN-activation Triton kernel (``fastres/triton/conv.py``) against
``fastres.reference.conv_bn_act``: every conv form of the ResNet family at tiny
sizes, each dtype and memory format, the epilogue variants, memory formats of
the output and the residual, the backward, opcheck, the forced tile configs,
the autotune key and the config pruner (shared memory and register budgets).

Without a GPU this runs under the Triton interpreter (``conftest.py``), so the
shapes are tiny: N <= 2, H, W <= 9, C, K <= 64 (the grouped cases) and mostly <= 32.
The interpreter accepts what the real compiler may reject: ``test_compiles_for_sm90``
also builds representative specializations with the real compiler for sm_90.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fastres import _triton_env, backends, ops, reference
from conftest import ACTIVATIONS, DEVICE, FORMATS, ConvCase, conv_inputs

_REASON = backends.unavailable_reason("triton", DEVICE)
pytestmark = pytest.mark.skipif(_REASON is not None, reason=str(_REASON))
if _REASON is None:
    from fastres.triton import conv

# Both sides round once to the output dtype a value computed in fp32 from the
# same inputs; only the fp32 summation order differs (~1e-6 relative for these
# reductions of <= 576 terms), so outputs agree to ~1 ulp of the output dtype:
# fp32 1.2e-7 (1e-4 leaves room for cancellation in small outputs), fp16 9.8e-4
# and bf16 7.8e-3 relative (1e-2 and 2e-2: a rounding-boundary flip plus
# cancellation near zero, where atol takes over).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-10),
    torch.float32: dict(rtol=1e-4, atol=1e-4),
    torch.float16: dict(rtol=1e-2, atol=1e-2),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def Case(name, *geometry, **kw) -> ConvCase:
    return ConvCase(*geometry, **kw, name=name)


# The interpreter's single config has BLOCK_K=16: C/groups a multiple of 16 takes
# the channel-tiled reduction, anything else the flat one; K=12, 20, 10 leave
# partial channel tiles, M = N*P*Q partial pixel tiles.
CASES = [
    Case("stem7x7s2p3-c3", 2, 3, 9, 9, 8, 7, 7, (2, 2), (3, 3)),
    Case("3x3s1p1", 2, 16, 7, 9, 16, 3, 3, padding=(1, 1)),
    Case("3x3s1p1-c32", 1, 32, 5, 5, 16, 3, 3, padding=(1, 1)),
    Case("3x3s2p1-k12", 2, 16, 9, 9, 12, 3, 3, (2, 2), (1, 1)),
    Case("1x1s1-c32k20", 2, 32, 5, 7, 20, 1, 1),
    Case("1x1s1-c8", 1, 8, 7, 9, 16, 1, 1),
    Case("1x1s2-k24", 2, 16, 9, 9, 24, 1, 1, (2, 2)),
    Case("3x3d2p2", 1, 16, 9, 9, 16, 3, 3, padding=(2, 2), dilation=(2, 2)),
    Case("3x3g4-cg2", 2, 8, 7, 7, 8, 3, 3, padding=(1, 1), groups=4),
    Case("3x3s2g4-cg4", 2, 16, 9, 9, 16, 3, 3, (2, 2), (1, 1), groups=4),
    Case("3x3g32-cg2", 1, 64, 5, 5, 64, 3, 3, padding=(1, 1), groups=32),
    Case("3x3-c24k10-odd", 1, 24, 7, 9, 10, 3, 3, padding=(1, 1)),
    Case("1x3s(2,1)p(0,1)", 1, 16, 6, 8, 8, 1, 3, (2, 1), (0, 1)),
    Case("3x3d(1,2)p(1,2)", 1, 16, 7, 9, 8, 3, 3, padding=(1, 2), dilation=(1, 2)),
    Case("1x1g2-c32", 2, 32, 5, 5, 24, 1, 1, groups=2),
]
_BY_NAME = {c.name: c for c in CASES}


@pytest.fixture(autouse=True, scope="module")
def _exact_fp32_and_few_configs():
    """fp32 compares exactly (no TF32 in the kernel nor in the reference); on a
    GPU, autotune over two small configs instead of the whole list (time)."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    configs = None
    if _REASON is None and not conv.INTERPRET:
        configs = conv._conv_bn_act_kernel.configs
        conv._conv_bn_act_kernel.configs = [conv._cfg(32, 16, 16, 4, 2), conv._cfg(64, 32, 32, 4, 2)]
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved
    if configs is not None:
        conv._conv_bn_act_kernel.configs = configs


def _expected(case, x, w, scale, shift, r, act):
    """The reference on the same inputs upcast to fp32, cast once (as the kernel rounds)."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    up = lambda t: None if t is None else t.to(ct)  # noqa: E731
    out = reference.conv_bn_act(up(x), up(w), scale, shift, up(r), *case.conv_args(), act)
    return out.to(x.dtype)


def _check(out, case, x, w, scale, shift, r, act):
    want = _expected(case, x, w, scale, shift, r, act)
    assert out.shape == want.shape and out.dtype == x.dtype
    assert out.stride() == F.conv2d(x, w, None, *case.conv_args()).stride(), "memory format must follow F.conv2d"
    torch.testing.assert_close(out, want, **TOL[x.dtype])


def _run(case, x, w, scale, shift, r, act):
    return ops.conv_bn_act(
        x, w, scale, shift, r, stride=case.stride, padding=case.padding, dilation=case.dilation,
        groups=case.groups, activation=act, backend="triton",
    )


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_forward_shapes(case, dtype, fmt):
    """Every conv form, dtype and format; the epilogue varies with the case (below, all of it)."""
    i = CASES.index(case)
    act, residual = ACTIVATIONS[i % len(ACTIVATIONS)], (i + len(fmt)) % 2 == 0
    x, w, scale, shift, r = conv_inputs(case, dtype, fmt, residual)
    _check(_run(case, x, w, scale, shift, r, act), case, x, w, scale, shift, r, act)


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["stem7x7s2p3-c3", "3x3s2p1-k12"])
def test_forward_epilogue(name, dtype, act, residual):
    case = _BY_NAME[name]
    x, w, scale, shift, r = conv_inputs(case, dtype, "nhwc", residual)
    _check(_run(case, x, w, scale, shift, r, act), case, x, w, scale, shift, r, act)


@pytest.mark.parametrize("name", ["3x3s2g4-cg4", "1x1s1-c32k20"])
def test_forward_fp64(name):
    case = _BY_NAME[name]
    x, w, scale, shift, r = conv_inputs(case, torch.float64, "nhwc", True)
    _check(_run(case, x, w, scale, shift, r, "silu"), case, x, w, scale, shift, r, "silu")


@pytest.mark.parametrize(
    "x_fmt,w_fmt", [("nchw", "nchw"), ("nchw", "nhwc"), ("nhwc", "nchw"), ("nhwc", "nhwc")],
    ids=["x-nchw,w-nchw", "x-nchw,w-nhwc", "x-nhwc,w-nchw", "x-nhwc,w-nhwc"],
)
def test_output_memory_format_follows_conv2d(x_fmt, w_fmt):
    case = _BY_NAME["3x3s2p1-k12"]
    x, w, scale, shift, r = conv_inputs(case, torch.float32, x_fmt, residual=False)
    w = w.contiguous(memory_format=FORMATS[w_fmt])
    _check(_run(case, x, w, scale, shift, r, "relu"), case, x, w, scale, shift, r, "relu")


@pytest.mark.parametrize("res_layout", ["other-format", "strided-view"])
@pytest.mark.parametrize("fmt", FORMATS)
def test_residual_own_strides(fmt, res_layout):
    """The residual is read through its own strides: another memory format than
    x (and than the output), or a non-dense view."""
    case = _BY_NAME["3x3s1p1"]
    other = "nchw" if fmt == "nhwc" else "nhwc"
    x, w, scale, shift, r = conv_inputs(case, torch.float16, fmt, residual=True, res_fmt=other)
    if res_layout == "strided-view":
        n, k, p, q = case.out_shape()
        r = torch.randn(n, k, p, 2 * q, device=DEVICE).to(x.dtype)[..., ::2]
    _check(_run(case, x, w, scale, shift, r, "relu"), case, x, w, scale, shift, r, "relu")


@pytest.mark.parametrize("name", ["stem7x7s2p3-c3", "3x3s1p1", "1x1s1-c8", "3x3d(1,2)p(1,2)", "1x1g2-c32"])
def test_forced_configs(name):
    """Each of the GPU tile configs (run directly, bypassing the autotuner) gives
    the right answer: BLOCK_K 16/32/64 in both reduction forms, every tile size."""
    case = _BY_NAME[name]
    x, w, scale, shift, r = conv_inputs(case, torch.float16, "nhwc", residual=True)
    for cfg in conv.GPU_CONFIGS:
        out = conv._conv_bn_act(x, w, scale, shift, r, *case.conv_args(), "relu", config=cfg)
        _check(out, case, x, w, scale, shift, r, "relu")


def _nan_framed(t):
    """``t`` as an NHWC view into the middle of a NaN-filled buffer one image longer at each end."""
    n, c, h, w = t.shape
    big = torch.full((n + 2, h, w, c), float("nan"), device=t.device, dtype=t.dtype)
    big[1:-1] = t.permute(0, 2, 3, 1)
    return big[1:-1].permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", ["stem7x7s2p3-c3", "3x3s1p1", "3x3s2g4-cg4", "1x1g2-c32"])
def test_reads_nothing_outside_the_tensors(name):
    """x, weight and residual sit between NaNs: a load that the padding, tail or
    group masks should have stopped would put a NaN in the output."""
    case = _BY_NAME[name]
    x, w, scale, shift, r = conv_inputs(case, torch.float32, "nhwc", residual=True)
    x, w, r = _nan_framed(x), _nan_framed(w), _nan_framed(r)
    assert x.is_contiguous(memory_format=torch.channels_last) and x.storage_offset() > 0
    _check(_run(case, x, w, scale, shift, r, "identity"), case, x, w, scale, shift, r, "identity")


def test_empty_batch():
    case = _BY_NAME["3x3s2p1-k12"]
    x, w, scale, shift, r = conv_inputs(case, torch.float16, "nhwc", residual=False)
    out = _run(case, x[:0], w, scale, shift, None, "relu")
    assert out.shape == (0, *case.out_shape()[1:]) and out.dtype == x.dtype


def _grads(fn, inputs, grad_out):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    out.backward(grad_out)
    return out, [t.grad for t in inputs]


@pytest.mark.parametrize("act", ["relu", "silu"])
@pytest.mark.parametrize("name", ["3x3s2g4-cg4", "1x1s1-c32k20"])
def test_backward(name, act):
    """Gradients of x, weight, scale, shift and residual against autograd through the reference."""
    case = _BY_NAME[name]
    x, w, scale, shift, r = conv_inputs(case, torch.float32, "nhwc", residual=True)
    g = torch.randn(case.out_shape(), device=DEVICE)
    out, grads = _grads(lambda *a: _run(case, *a, act), [x, w, scale, shift, r], g)
    ref, ref_grads = _grads(
        lambda *a: reference.conv_bn_act(*a, *case.conv_args(), act), [x, w, scale, shift, r], g
    )
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    for label, got, want in zip(["x", "weight", "scale", "shift", "residual"], grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"grad of {label}: {m}")


def test_gradcheck_fp64():
    case = Case("tiny", 1, 2, 3, 3, 2, 2, 2, padding=(1, 1))
    x, w, scale, shift, r = (
        t.detach().double().requires_grad_() for t in conv_inputs(case, torch.float64, "nhwc", residual=True)
    )
    assert torch.autograd.gradcheck(lambda *a: _run(case, *a, "silu"), (x, w, scale, shift, r))


@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
@pytest.mark.parametrize("name", ["3x3s2g4-cg4", "1x1s1-c8"])
def test_opcheck(name, requires_grad):
    case = _BY_NAME[name]
    x, w, scale, shift, r = conv_inputs(case, torch.float32, "nhwc", residual=True)
    for t in (x, w, scale, shift, r):
        t.requires_grad_(requires_grad)
    op = torch.ops.fastres.conv_bn_act_triton
    torch.library.opcheck(op, (x, w, scale, shift, r, *case.conv_args(), "relu"))
    torch.library.opcheck(op, (x, w, scale, shift, None, *case.conv_args(), "identity"))


def _key(case, dtype=torch.float16):
    x, w, scale, shift, r = conv_inputs(case, dtype, "nhwc", residual=True)
    _, args = conv._prepare(x, w, scale, shift, r, *case.conv_args(), "relu")
    return tuple(args[k] for k in conv.TUNE_KEY)


def test_autotune_key_buckets_the_batch():
    """Batch sizes in the same log2 bucket of M = N*P*Q share the tuning; the geometry does not."""
    base = Case("k", 3, 16, 9, 9, 16, 3, 3, (2, 2), (1, 1))  # 5x5 output: M = 75
    same_bucket = Case("k", 4, 16, 9, 9, 16, 3, 3, (2, 2), (1, 1))  # M = 100, both in (64, 128]
    assert _key(base) == _key(same_bucket)
    assert _key(base) != _key(Case("k", 1, 16, 9, 9, 16, 3, 3, (2, 2), (1, 1)))  # M = 25
    assert _key(base) != _key(Case("k", 3, 16, 9, 9, 16, 3, 3, (1, 1), (1, 1)))  # stride
    assert not {"M", "N", "H", "W", "P", "Q"} & set(conv.TUNE_KEY)
    # the autotuner's own record of its key, where this triton has one (Autotuner.keys, not in 3.1)
    assert getattr(conv._conv_bn_act_kernel, "keys", conv.TUNE_KEY) == conv.TUNE_KEY


def _pruned(case, dtype, fmt="nhwc", residual=False):
    x, w, scale, shift, r = conv_inputs(case, dtype, fmt, residual)
    _, args = conv._prepare(x, w, scale, shift, r, *case.conv_args(), "relu")
    return args, conv.prune_configs(conv.GPU_CONFIGS, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize(
    "case",
    [
        Case("resnext-l1", 2, 128, 9, 9, 128, 3, 3, padding=(1, 1), groups=32),  # 4 channels per group
        Case("stem", 2, 3, 33, 33, 64, 7, 7, (2, 2), (3, 3)),
        Case("wide", 8, 256, 14, 14, 1024, 1, 1),
        Case("layer4-batch1", 1, 512, 7, 7, 512, 3, 3, padding=(1, 1)),  # M = 49
    ],
    ids=lambda c: c.name,
)
def test_pruner(case, dtype):
    args, kept = _pruned(case, dtype)
    assert kept, "the pruner must keep at least one config"
    elem = torch.empty((), dtype=dtype).element_size()
    smem = conv._smem_limit(torch.device(DEVICE))
    for cfg in kept:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        assert (bm * bk + bk * bn) * elem * cfg.num_stages == conv.smem_bytes(cfg, elem) <= smem
        assert conv.fits_registers(cfg, args)
        assert bn <= max(16, conv._next_pow2(args["KG"]))
        assert bm <= max(16, 1 << args["M_BUCKET"])
        if conv._is_flat(args["CG"], bk):
            assert bk <= max(16, conv._next_pow2(args["CG"] * args["R"] * args["S"]))
    if case.name == "resnext-l1":
        assert {cfg.kwargs["BLOCK_N"] for cfg in kept} == {16}
    if case.name == "wide" and dtype == torch.float16:
        assert len(kept) > 5, "big GEMMs keep most of the configs"


def _acc_per_thread(cfg):
    return cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] // (32 * cfg.num_warps)


@pytest.mark.parametrize(
    "dtype,fmt,residual,most",
    [
        (torch.float16, "nhwc", False, 128),
        (torch.float16, "nhwc", True, 128),  # a vectorized NHWC residual: the big tiles stay
        (torch.float16, "nchw", False, 32 if _triton_env.version_tuple() < (3, 8) else 128),
        # scalar residual loads into an NCHW tile: they spill (before triton 3.8 any NCHW tile above 32)
        (torch.float16, "nchw", True, 32 if _triton_env.version_tuple() < (3, 8) else 64),
        (torch.float32, "nhwc", False, 32),  # exact fp32 (the fixture turns TF32 off): FMA units
        (torch.float64, "nhwc", False, 16),
    ],
    ids=str,
)
def test_pruner_register_budget(dtype, fmt, residual, most):
    """The largest accumulator (elements per thread) the pruner keeps for a big GEMM
    in each specialization: the ones above spill on sm_90 (scripts/triton_compile_check.py)."""
    _, kept = _pruned(Case("wide", 8, 256, 14, 14, 1024, 1, 1), dtype, fmt, residual)
    assert max(map(_acc_per_thread, kept)) == most


def test_pruner_flat_reduction_register_budget():
    """The flat reduction decodes (r, s, c) per A element: 128x64x64 on 4 warps spills
    there (the stem's C=3), not in the channel-tiled form (C=64)."""
    def tiles(c):
        _, kept = _pruned(Case("k", 8, c, 33, 33, 64, 7, 7, (2, 2), (3, 3)), torch.float16)
        return {(k.kwargs["BLOCK_M"], k.kwargs["BLOCK_N"], k.kwargs["BLOCK_K"]) for k in kept}

    assert (128, 64, 64) not in tiles(3)
    assert (128, 64, 64) in tiles(64)


def test_compiles_for_sm90():
    """The real Triton compiler and ptxas, not the interpreter, build representative
    specializations for sm_90 with no GPU (scripts/triton_compile_check.py --quick):
    each compiles, fits the pruner's shared memory estimate, runs its reduction on
    tensor cores where it should, and does not spill. In a subprocess: this one has
    TRITON_INTERPRET=1, under which the kernel is an InterpretedFunction and conv.py
    has its interpreter configs. Skipped where this Triton cannot compile for CUDA."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "triton_compile_check.py"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_input_precision_follows_cudnn_tf32_flag():
    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = True
        assert conv._input_precision(torch.float32) == "tf32"
        torch.backends.cudnn.allow_tf32 = False
        assert conv._input_precision(torch.float32) == "ieee"
        assert conv._input_precision(torch.float64) == "ieee"
    finally:
        torch.backends.cudnn.allow_tf32 = saved
