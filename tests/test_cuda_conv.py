"""The CUDA C++ fused convolution ``conv_bn_act_cuda`` (csrc/cuda/conv_bn_act*.cu,
docs/cuda_conv.md) against ``fastres.reference.conv_bn_act``.

Without a GPU (CI): the op was built (CUTLASS found) with every kernel
configuration in the binary, the dispatcher has its CUDA kernel and no CPU one,
its schema equals the Triton twin's, ``implemented_backends`` lists "cuda", CPU
tensors are refused, and the shape rules that route convolutions
(``_conv_bn_act_cuda_unsupported``, ``fastres._extension.cuda_conv_unsupported_reason``)
hold, ResNet-50 and ResNeXt-50 included.

On a GPU (scripts/gpu_check.sh): every distinct convolution of ResNet-50 and
ResNeXt-50 32x4d (fastres.shapes) at batch 8 (fp16/bf16 x NCHW/NHWC x the six
epilogues: with/without residual x relu/silu/identity) and batch 32 (a reduced
epilogue matrix), every tile configuration, channel padding, TF32, layouts,
alignment, NaN, batch chunking, errors, autograd and opcheck.
"""
import importlib.util
import os
import re

import pytest
import torch
import torch.nn.functional as F

from fastres import _conv, _extension, _layout, backends, ops, reference, shapes
from conftest import ACTIVATIONS, FORMATS, conv_inputs
from conftest import ConvCase as Conv

HAS_GPU = torch.cuda.is_available()
DEV = "cuda"  # the GPU tests' device
BUILT = _extension.LOADED and hasattr(torch.ops.fastres, "conv_bn_act_cuda")
CUTLASS_HERE = bool(
    importlib.util.find_spec("cutlass_library") or os.environ.get("CUTLASS_PATH")
    or os.environ.get("FASTRES_CUTLASS_INCLUDE")
)
needs_op = pytest.mark.skipif(
    not BUILT, reason="fastres._C has no conv_bn_act_cuda (C++-only build, or built without CUTLASS)"
)
needs_gpu = pytest.mark.skipif(not (BUILT and HAS_GPU), reason="needs a CUDA GPU and conv_bn_act_cuda")

# The kernels: 5 tiles x {float16, bfloat16} + 1 TF32 (conv_bn_act.cuh ConvTile).
N_KERNELS = 11
TILES_16BIT = ["128x128", "128x64", "64x64", "128x32"]


def _sm_major() -> int:
    return torch.cuda.get_device_capability()[0] if HAS_GPU else 9


def _unsupported(dtype, c, k, r=3, s=3, groups=1, major=9, h=56, w=56, stride=(1, 1), padding=(1, 1),
                 dilation=(1, 1)) -> str:
    return torch.ops.fastres._conv_bn_act_cuda_unsupported(
        dtype, c, h, w, k, r, s, list(stride), list(padding), list(dilation), groups, major
    )


# ---------------------------------------------------------------------------
# Without a GPU.
# ---------------------------------------------------------------------------


@pytest.mark.skipif(not (_extension.LOADED and _extension.has_cuda_kernels()), reason="no CUDA build of fastres._C")
def test_built_with_cutlass_when_available():
    """A CUDA build with CUTLASS on the machine must have built the conv kernels
    (setup.py says why it did not, e.g. a CUTLASS without the needed headers)."""
    if not CUTLASS_HERE:
        pytest.skip("no CUTLASS on this machine (pip install nvidia-cutlass)")
    assert BUILT, "CUTLASS is installed but fastres._C was built without conv_bn_act_cuda; see setup.py's output"


@needs_op
def test_every_kernel_is_in_the_binary():
    """The 11 CUTLASS kernels were compiled and registered (their host stubs
    carry the mangled names) for the architectures the build reports."""
    import fastres._C as ext

    data = open(ext.__file__, "rb").read()
    kernel = rb"_ZN7cutlass6KernelINS_4conv6kernel23ImplicitGemmConvolution\w*?BnActEpilogue\w*?EvNT_6ParamsE"
    names = set(re.findall(kernel, data))
    assert len(names) == N_KERNELS, f"expected {N_KERNELS} BnActEpilogue conv kernels, found {len(names)}"
    assert torch.ops.fastres._cuda_arch_list(), "a CUDA build reports its TORCH_CUDA_ARCH_LIST"


@needs_op
def test_dispatcher_has_cuda_kernel_only():
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fastres::conv_bn_act_cuda", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("fastres::conv_bn_act_cuda", "CPU")


@needs_op
def test_implemented_backends_lists_cuda():
    assert "cuda" in backends.implemented_backends("conv_bn_act")


@needs_op
def test_schema_matches_triton_twin():
    if not hasattr(torch.ops.fastres, "conv_bn_act_triton"):
        pytest.skip("fastres::conv_bn_act_triton is not defined (triton missing)")

    def signature(op):
        schema = getattr(torch.ops.fastres, op).default._schema
        return (
            [(a.name, str(a.type), a.kwarg_only, a.alias_info is not None) for a in schema.arguments],
            [(str(r.type), r.alias_info is not None) for r in schema.returns],
        )

    assert signature("conv_bn_act_cuda") == signature("conv_bn_act_triton")


def _cpu_args(dtype=torch.float16):
    x = torch.randn(1, 8, 5, 5).to(dtype)
    w = torch.randn(8, 8, 3, 3).to(dtype)
    return x, w, torch.ones(8), torch.zeros(8), None, [1, 1], [1, 1], [1, 1], 1, "relu"


@needs_op
def test_op_rejects_cpu_tensors():
    with pytest.raises(NotImplementedError, match="Could not run 'fastres::conv_bn_act_cuda' with arguments from the 'CPU' backend"):
        torch.ops.fastres.conv_bn_act_cuda(*_cpu_args())


@needs_op
def test_public_api_cuda_backend_refuses_cpu_tensors():
    x, w, scale, shift, *_ = _cpu_args(torch.float32)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: the cuda backend needs CUDA tensors"):
        ops.conv_bn_act(x, w, scale, shift, padding=1, backend="cuda")


@needs_op
def test_predicate_without_cuda_tensors():
    x, w, *_ = _cpu_args()
    reason = _extension.cuda_conv_unsupported_reason(x, w, [1, 1], [1, 1], [1, 1], 1)
    assert reason is not None and "CUDA tensors" in reason


@needs_op
@pytest.mark.parametrize(
    "dtype,c,k,r,s,groups,major,expect",
    [
        (torch.float16, 64, 64, 3, 3, 1, 8, None),  # Ampere
        (torch.bfloat16, 3, 64, 7, 7, 1, 9, None),  # the stem: C padded to 4
        (torch.float16, 20, 10, 1, 1, 1, 8, None),  # C and K padded to 24 and 16
        (torch.float32, 20, 10, 3, 3, 1, 9, None),  # TF32 (allowed by default)
        (torch.float16, 1024, 1024, 3, 3, 32, 9, None),  # ResNeXt-50 layer4: 32 per group
        (torch.float16, 2048, 2048, 3, 3, 32, 9, None),  # ResNeXt-101 32x8d layer4: 64 per group
        (torch.float32, 512, 2048, 3, 3, 32, 9, None),  # TF32 grouped: 16 in, 64 out per group
        (torch.float16, 128, 128, 3, 3, 32, 9, "4 input and 4 output channels per group"),
        (torch.bfloat16, 512, 512, 3, 3, 32, 9, "16 input and 16 output channels per group"),
        (torch.float32, 1024, 1024, 3, 3, 32, 9, "32 input and 32 output channels per group"),
        (torch.float64, 64, 64, 3, 3, 1, 9, "float64"),
        (torch.float16, 64, 64, 3, 3, 1, 7, "compute capability 8.0"),
        (torch.float16, 64, 64, 33, 1, 1, 9, "33x1 window"),
    ],
)
def test_shape_rules(dtype, c, k, r, s, groups, major, expect):
    torch.backends.cudnn.allow_tf32 = True  # PyTorch's default (the autouse fixture restores the setting)
    reason = _unsupported(dtype, c, k, r, s, groups, major)
    if expect is None:
        assert reason == ""
    else:
        assert expect in reason and "backend='triton'" in reason, reason


@needs_op
@pytest.mark.parametrize(
    "dtype,c,k,h,w,r,stride,padding,expect",
    [
        # one image of x above 2^31 bytes: 16-bit 2^16 x 2^12 pixels x 8 channels = 2^32 bytes
        (torch.float16, 8, 8, 2**16, 2**12, 1, 1, 0, "one input image"),
        (torch.float16, 8, 8, 2**15, 2**12, 1, 1, 0, "one input image"),  # 2^31 bytes: one too many
        (torch.float16, 8, 8, 2**14, 2**12, 1, 1, 0, None),  # 2^30 bytes
        # the padded channels count: C=1 pads to 8, so 2^14 x 2^14 x 8 x 2 bytes = 2^32
        (torch.float16, 1, 8, 2**14, 2**14, 1, 1, 0, "one input image"),
        (torch.float16, 8, 2**14, 2**11, 2**11, 1, 1, 0, "one output image"),  # 2^22 pixels x 2^14 x 2 bytes
        (torch.float16, 2**12, 2**12, 8, 8, 32, 1, 16, "the weight"),  # 2^24 x 32 x 32 x 2 bytes
        (torch.float16, 8, 8, 7, 7, 3, 1, 2**30, "32-bit coordinates"),  # H + 2 * padding > 2^31 - 1
        (torch.float16, 8, 8, 7, 7, 3, 2**31, 1, "32-bit coordinates"),
    ],
)
def test_size_rules(dtype, c, k, h, w, r, stride, padding, expect):
    """The C++ size rules (2^31-byte tensors, 32-bit coordinates) are part of the one rule
    that routing asks, so backend=None sends such a conv to another backend instead of
    the op raising (the op checks the same rule: test_size_rule_is_the_ops_rule)."""
    reason = _unsupported(dtype, c, k, r, r, 1, 9, h, w, (stride, stride), (padding, padding))
    if expect is None:
        assert reason == ""
    else:
        assert expect in reason and "backend='triton'" in reason, reason


@needs_op
@pytest.mark.parametrize("h,r,stride,padding,want", [(3, 4, 2, 0, 0), (4, 4, 2, 0, 1), (3, 4, 2, 1, 1), (7, 3, 2, 1, 4)])
def test_output_size_is_pytorchs(h, r, stride, padding, want):
    """The C++ output size is PyTorch's (floor division): H=3, R=4, stride 2 has no output
    (truncating division gave 1, a window starting past the input). The rule measures
    the output image with it: an empty output costs no bytes."""
    if want > 0:
        assert F.conv2d(torch.zeros(1, 1, h, h), torch.zeros(1, 1, r, r), stride=stride, padding=padding).shape[2] == want
    else:
        with pytest.raises(RuntimeError, match="Kernel size can't be greater than actual input size"):
            F.conv2d(torch.zeros(1, 1, h, h), torch.zeros(1, 1, r, r), stride=stride, padding=padding)
    assert _conv.out_size(h, r, stride, padding, 1) == want
    # P x (2^17 - r + 1) output pixels of 2^14 fp16 channels: over 2^31 bytes unless P == 0
    reason = _unsupported(torch.float16, 8, 2**14, r, r, 1, 9, h, 2**17, (stride, 1), (padding, 0))
    assert (reason != "") == (want > 0), reason


@needs_gpu
def test_empty_output_is_rejected():
    x = torch.randn(1, 8, 3, 3, device=DEV, dtype=torch.float16)
    w = torch.randn(8, 8, 4, 4, device=DEV, dtype=torch.float16)
    with pytest.raises(ValueError, match="output would be empty"):
        torch.ops.fastres.conv_bn_act_cuda(x, w, torch.ones(8, device=DEV), torch.zeros(8, device=DEV), None,
                                           [2, 2], [0, 0], [1, 1], 1, "relu")


@needs_op
def test_float32_needs_tf32_permission():
    saved = torch.backends.cudnn.allow_tf32
    try:
        torch.backends.cudnn.allow_tf32 = False
        assert "allow_tf32" in _unsupported(torch.float32, 64, 64)
        assert _unsupported(torch.float16, 64, 64) == ""  # 16-bit inputs do not depend on it
        torch.backends.cudnn.allow_tf32 = True
        assert _unsupported(torch.float32, 64, 64) == ""
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@needs_op
@pytest.mark.parametrize("arch", ["resnet50", "resnext50_32x4d"])
def test_resnet_routing(arch):
    """Every ResNet-50 conv runs on the CUDA kernels; of ResNeXt-50 32x4d's grouped
    3x3 convs (4, 8, 16, 32 channels per group) only layer4's (32) do, the
    others go to the next backend (docs/cuda_conv.md, "Which shapes go where")."""
    for dtype in (torch.float16, torch.bfloat16):
        for cs in shapes.conv_shapes(arch, batch=8):
            reason = _unsupported(dtype, cs.C, cs.K, cs.R, cs.S, cs.groups, 9)
            expect_supported = cs.groups == 1 or cs.C // cs.groups == 32
            assert (reason == "") == expect_supported, f"{arch} {cs.label}: {reason!r}"


# ---------------------------------------------------------------------------
# On a GPU.
# ---------------------------------------------------------------------------

# The kernels round once from an fp32 value that differs from the fp32-upcast
# reference only by the summation order (~1e-6 relative), so outputs agree to a
# rounding flip: 1 ulp of the output dtype (fp16 2^-10, bf16 2^-7 relative),
# with atol for results near zero. float32 runs on TF32 tensor cores (inputs
# rounded to 10 mantissa bits, 2^-11) against an exact-fp32 reference.
TOL = {
    torch.float16: dict(rtol=2e-3, atol=2e-3),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2),
    torch.float32: dict(rtol=1e-2, atol=1e-2),
}


@pytest.fixture(autouse=True)
def _exact_fp32_reference():
    """The reference's float32 convolution must be exact (no TF32 in cuDNN) for
    upcast 16-bit inputs; tests that run float32 kernels re-allow TF32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _inputs(cv: Conv, dtype, fmt="nhwc", residual=True, res_fmt=None):
    return conv_inputs(cv, dtype, fmt, residual, res_fmt, device=DEV)


def _conv_ref(cv: Conv, x, w):
    """The convolution of the inputs upcast to fp32 (exact, TF32 off)."""
    return F.conv2d(x.float(), w.float(), None, *cv.conv_args())


def _expected(conv, scale, shift, r, act, dtype):
    return reference.bn_act(conv, scale, shift, None if r is None else r.float(), act).to(dtype)


def _run(cv: Conv, x, w, scale, shift, r, act, backend="cuda"):
    return ops.conv_bn_act(x, w, scale, shift, r, stride=cv.stride, padding=cv.padding, dilation=cv.dilation,
                           groups=cv.groups, activation=act, backend=backend)


def _check(out, want, x, w, cv, what=""):
    assert out.shape == want.shape and out.dtype == x.dtype, what
    fmt = torch.channels_last if _layout.conv_out_channels_last(x, w) else torch.contiguous_format
    assert out.stride() == torch.empty(out.shape, memory_format=fmt).stride(), \
        f"{what}: the output memory format must follow F.conv2d's"
    torch.testing.assert_close(out, want, **TOL[x.dtype], msg=lambda m: f"{what}: {m}")


def _supported(cv: Conv, dtype) -> bool:
    return _unsupported(dtype, cv.c, cv.k, cv.r, cv.s, cv.groups, _sm_major(), cv.h, cv.w, cv.stride, cv.padding,
                        cv.dilation) == ""


def _model_cases(batch):
    seen, cases = set(), []
    for arch in ("resnet50", "resnext50_32x4d"):
        for cs in shapes.conv_shapes(arch, batch=batch):
            cv = Conv.of(cs, batch)
            if cv not in seen:
                seen.add(cv)
                cases.append(pytest.param(cv, id=f"{arch}:{cs.label}"))
    return cases


# The six epilogues (residual x activation) at batch 8; at batch 32 two per
# (dtype, format): one with and one without residual, the activations rotating.
EPILOGUES = [(res, act) for res in (False, True) for act in ACTIVATIONS]


def _run_epilogues(cv, dtype, fmt, epilogues):
    if not _supported(cv, dtype):
        x, w, scale, shift, r = _inputs(cv, dtype, fmt, residual=False)
        with pytest.raises(NotImplementedError, match="per group"):
            _run(cv, x, w, scale, shift, r, "relu")
        assert _extension.cuda_conv_unsupported_reason(x, w, *cv.conv_args()) is not None
        return
    x, w, scale, shift, r = _inputs(cv, dtype, fmt, residual=True)
    conv = _conv_ref(cv, x, w)
    assert _extension.cuda_conv_unsupported_reason(x, w, *cv.conv_args()) is None
    for with_res, act in epilogues:
        rr = r if with_res else None
        out = _run(cv, x, w, scale, shift, rr, act)
        _check(out, _expected(conv, scale, shift, rr, act, dtype), x, w, cv, f"residual={with_res} {act}")


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cv", _model_cases(8))
def test_model_convs_batch8(cv, dtype, fmt):
    _run_epilogues(cv, dtype, fmt, EPILOGUES)


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("cv", _model_cases(32))
def test_model_convs_batch32(cv, dtype, fmt):
    j = 2 * (dtype == torch.bfloat16) + (fmt == "nchw")
    _run_epilogues(cv, dtype, fmt, [(True, ACTIVATIONS[j % 3]), (False, ACTIVATIONS[(j + 1) % 3])])


# Small convolutions of every form: odd channel counts (padding paths), stride,
# dilation, asymmetric windows, partial tiles, grouped.
SMALL = {
    "stem-c3k10": Conv(2, 3, 17, 19, 10, 7, 7, (2, 2), (3, 3)),
    "c1k8": Conv(2, 1, 9, 9, 8, 3, 3, padding=(1, 1)),
    "c20k10": Conv(2, 20, 9, 11, 10, 3, 3, padding=(1, 1)),
    "c8k24-1x1s2": Conv(3, 8, 9, 9, 24, 1, 1, (2, 2)),
    "c40k72-d2": Conv(2, 40, 11, 11, 72, 3, 3, padding=(2, 2), dilation=(2, 2)),
    "c16k16-1x3s21": Conv(2, 16, 8, 10, 16, 1, 3, (2, 1), (0, 1)),
    "c64k64-3x3d12": Conv(1, 64, 9, 9, 64, 3, 3, padding=(1, 2), dilation=(1, 2)),
    "g2-cg32kg32": Conv(2, 64, 7, 7, 64, 3, 3, padding=(1, 1), groups=2),
    "g4-cg32kg64": Conv(2, 128, 6, 6, 256, 3, 3, (2, 2), (1, 1), groups=4),
    "g2-cg32kg128": Conv(1, 64, 5, 5, 256, 1, 1, groups=2),
}


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", SMALL)
def test_small_convs(name, dtype, fmt):
    _run_epilogues(SMALL[name], dtype, fmt, EPILOGUES)


@needs_gpu
@pytest.mark.parametrize("tile", TILES_16BIT)
@pytest.mark.parametrize("name", ["c40k72-d2", "stem-c3k10", "g2-cg32kg128", "c64k64-3x3d12"])
def test_every_tile(name, tile, monkeypatch):
    """Each 16-bit tile (forced through FASTRES_CUDA_CONV_TILE) on partial M and
    N tiles, padding and dilation; the stem kernel ignores the knob."""
    cv = SMALL[name]
    if cv.groups > 1 and (cv.k // cv.groups) % int(tile.split("x")[1]) != 0:
        pytest.skip("tile wider than the group")
    monkeypatch.setenv("FASTRES_CUDA_CONV_TILE", tile)
    for dtype in (torch.float16, torch.bfloat16):
        _run_epilogues(cv, dtype, "nhwc", [(True, "silu")])


@needs_gpu
def test_forced_tile_errors(monkeypatch):
    cv = SMALL["g2-cg32kg32"]
    x, w, scale, shift, r = _inputs(cv, torch.float16)
    monkeypatch.setenv("FASTRES_CUDA_CONV_TILE", "128x128")
    with pytest.raises(ValueError, match="cannot run a grouped conv with K/groups=32"):
        _run(cv, x, w, scale, shift, r, "relu")
    monkeypatch.setenv("FASTRES_CUDA_CONV_TILE", "256x256")
    with pytest.raises(ValueError, match="is not a tile"):
        _run(cv, x, w, scale, shift, r, "relu")


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["stem-c3k10", "c20k10", "c40k72-d2", "g4-cg32kg64", "c64k64-3x3d12"])
def test_tf32(name, fmt):
    """float32 on TF32 tensor cores when cuDNN may use TF32, refused otherwise."""
    cv = SMALL[name]
    x, w, scale, shift, r = _inputs(cv, torch.float32, fmt, residual=True)
    conv = _conv_ref(cv, x, w)
    with pytest.raises(NotImplementedError, match="allow_tf32"):
        _run(cv, x, w, scale, shift, r, "relu")
    torch.backends.cudnn.allow_tf32 = True
    if not _supported(cv, torch.float32):
        with pytest.raises(NotImplementedError, match="per group"):
            _run(cv, x, w, scale, shift, r, "relu")
        return
    for with_res, act in EPILOGUES:
        rr = r if with_res else None
        _check(_run(cv, x, w, scale, shift, rr, act), _expected(conv, scale, shift, rr, act, torch.float32), x, w,
               cv, f"residual={with_res} {act}")


@needs_gpu
def test_float64_is_not_implemented():
    cv = SMALL["c20k10"]
    x, w, scale, shift, r = _inputs(cv, torch.float64)
    with pytest.raises(NotImplementedError, match="float64.*backend='triton'"):
        _run(cv, x, w, scale.double(), shift.double(), r, "relu")


@needs_gpu
@pytest.mark.parametrize("x_fmt,w_fmt", [("nchw", "nchw"), ("nchw", "nhwc"), ("nhwc", "nchw"), ("nhwc", "nhwc")])
@pytest.mark.parametrize("res_fmt", FORMATS)
def test_layouts(x_fmt, w_fmt, res_fmt):
    """Output format = F.conv2d's (channels_last if x or weight is); a residual
    in either format."""
    cv = SMALL["c40k72-d2"]
    x, w, scale, shift, r = _inputs(cv, torch.float16, x_fmt, residual=True, res_fmt=res_fmt)
    w = w.contiguous(memory_format=FORMATS[w_fmt])
    out = _run(cv, x, w, scale, shift, r, "relu")
    _check(out, _expected(_conv_ref(cv, x, w), scale, shift, r, "relu", x.dtype), x, w, cv)


@needs_gpu
def test_unaligned_and_strided_views():
    """Storage offsets that break 16-byte alignment and non-dense views are copied."""
    cv = SMALL["c40k72-d2"]
    x, w, scale, shift, r = _inputs(cv, torch.bfloat16, "nhwc", residual=True)
    n, c, h, wd = x.shape
    base = torch.empty(x.numel() + 1, device=DEV, dtype=x.dtype)
    xs = base[1:].view(n, h, wd, c).permute(0, 3, 1, 2)
    xs.copy_(x)
    assert xs.is_contiguous(memory_format=torch.channels_last) and xs.data_ptr() % 16 != 0
    rs = torch.randn(*r.shape[:3], 2 * r.shape[3], device=DEV).to(r.dtype)[..., ::2]
    ss, hs = (torch.rand(2 * cv.k, device=DEV) + 0.5)[::2], shift
    out = _run(cv, xs, w, ss, hs, rs, "silu")
    _check(out, _expected(_conv_ref(cv, x, w), ss, hs, rs, "silu", x.dtype), xs, w, cv)


@needs_gpu
def test_nan_propagates_through_relu():
    cv = SMALL["c40k72-d2"]
    x, w, scale, shift, r = _inputs(cv, torch.float16, "nhwc", residual=True)
    r[0, 5, 2, 3] = float("nan")
    shift[7] = float("nan")
    out = _run(cv, x, w, scale, shift, r, "relu")
    want = _expected(_conv_ref(cv, x, w), scale, shift, r, "relu", x.dtype)
    assert torch.isnan(out[0, 5, 2, 3]) and torch.isnan(out[:, 7]).all()
    torch.testing.assert_close(out, want, equal_nan=True, **TOL[x.dtype])


@needs_gpu
def test_empty_batch():
    cv = SMALL["c20k10"]
    x, w, scale, shift, _ = _inputs(cv, torch.float16, residual=False)
    out = _run(cv, x[:0], w, scale, shift, None, "relu")
    assert out.shape == (0, *cv.out_shape()[1:])


@needs_gpu
def test_argument_errors():
    cv = SMALL["c20k10"]
    x, w, scale, shift, r = _inputs(cv, torch.float16)
    op = torch.ops.fastres.conv_bn_act_cuda
    args = dict(stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1, activation="relu")

    def call(**kw):
        a = {**dict(x=x, weight=w, scale=scale, shift=shift, residual=r), **args, **kw}
        return op(a["x"], a["weight"], a["scale"], a["shift"], a["residual"], a["stride"], a["padding"],
                  a["dilation"], a["groups"], a["activation"])

    with pytest.raises(ValueError, match="expected `stride` to have 2 values"):
        call(stride=[1])
    with pytest.raises(ValueError, match="expected `scale` to be a 1-D float32 tensor of length 10"):
        call(scale=scale.half())
    with pytest.raises(ValueError, match="expected `residual` of the output's shape"):
        call(residual=r[:, :5])
    with pytest.raises(ValueError, match="expected `weight` to have the dtype and device of `x`"):
        call(weight=w.float())
    with pytest.raises(ValueError, match="unknown activation 'gelu'"):
        call(activation="gelu")
    with pytest.raises(ValueError, match="K divisible by groups=3"):
        call(groups=3)


@needs_gpu
def test_batch_chunks_under_2gb():
    """An input above 2^31 bytes runs in batch chunks (CUTLASS's 32-bit offsets)."""
    cv = Conv(17, 64, 1000, 1000, 8, 1, 1)  # x: 1.09e9 fp16 elements = 2.18 GB
    if torch.cuda.get_device_properties(0).total_memory < 24 * 2**30:
        pytest.skip("needs 24 GiB of GPU memory")
    x, w, scale, shift, _ = _inputs(cv, torch.float16, "nhwc", residual=False)
    assert x.numel() * x.element_size() >= 2**31
    out = _run(cv, x, w, scale, shift, None, "identity")
    want = torch.cat([_expected(_conv_ref(cv, x[i:i + 4], w), scale, shift, None, "identity", x.dtype)
                      for i in range(0, cv.n, 4)])
    torch.testing.assert_close(out, want, **TOL[x.dtype])


@needs_gpu
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_backward(act):
    """Gradients through the cuda op: aten's conv backward + the fused bn_act backward (fastres/ops.py)."""
    cv = SMALL["c40k72-d2"]
    x, w, scale, shift, r = _inputs(cv, torch.float16, "nhwc", residual=True)
    g = torch.randn(cv.out_shape(), device=DEV).to(x.dtype)

    def grads(fn):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w, scale, shift, r)]
        fn(*leaves).backward(g)
        return [t.grad.float() for t in leaves]

    got = grads(lambda *a: _run(cv, *a, act))
    want = grads(lambda *a: ops.conv_bn_act(*a, stride=cv.stride, padding=cv.padding, dilation=cv.dilation,
                                            activation=act, backend="torch"))
    for name, a, b in zip(["x", "weight", "scale", "shift", "residual"], got, want):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2, msg=lambda m: f"grad of {name}: {m}")


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_opcheck(fmt):
    cv = SMALL["c40k72-d2"]
    x, w, scale, shift, r = _inputs(cv, torch.float16, fmt, residual=True)
    op = torch.ops.fastres.conv_bn_act_cuda
    torch.library.opcheck(op, (x, w, scale, shift, r, *cv.conv_args(), "relu"))
    torch.library.opcheck(op, (x, w, scale, shift, None, *cv.conv_args(), "identity"))


@needs_gpu
def test_cuda_is_a_default_candidate_where_supported():
    """backend=None chooses per shape (fastres.tune); the cuda kernel is one of its candidates here."""
    from fastres import _tune

    cv = SMALL["c40k72-d2"]
    x, w, scale, shift, r = _inputs(cv, torch.float16)
    assert _extension.cuda_conv_unsupported_reason(x, w, *cv.conv_args()) is None
    assert "cuda" in _tune.candidates((x, w, scale, shift, None, *cv.conv_args(), "relu"))


def _stem_extra_positions(r, s, c_pad=4, k_tile=32):
    """The filter positions (r', s') past the R x S window that the stem kernel's
    fixed-channels iterators read (docs/cuda_conv.md): its k-tiles cover k_tile / c_pad
    positions each, so the last one runs from R*S up to the next multiple of that."""
    per_tile = k_tile // c_pad
    return [divmod(i, s) for i in range(r * s, -(-r * s // per_tile) * per_tile)]


@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_stem_inf_reaches_exactly_the_documented_outputs(dtype):
    """An Inf in the stem's input: the outputs F.conv2d gives agree (Inf/NaN where its
    window holds the Inf), and exactly the outputs of docs/cuda_conv.md's rule differ:
    those whose window, extended by the positions the last k-tile reads past R x S
    (7x7: one more row, r = 7, s = 0..6), holds it become NaN in every channel."""
    cv = Conv(2, 3, 40, 40, 64, 7, 7, (2, 2), (3, 3))
    x, w, scale, shift, _ = _inputs(cv, dtype, "nchw", residual=False)
    n0, h0, w0 = 1, 18, 22
    x[n0, 1, h0, w0] = float("inf")
    out = _run(cv, x, w, scale, shift, None, "identity").float()
    want = _expected(_conv_ref(cv, x, w), scale, shift, None, "identity", dtype).float()
    _, _, P, Q = out.shape
    poisoned = torch.zeros(cv.n, P, Q, dtype=torch.bool, device=DEV)
    for r, s in _stem_extra_positions(cv.r, cv.s):
        p, pr = divmod(h0 + cv.padding[0] - r, cv.stride[0])
        q, qr = divmod(w0 + cv.padding[1] - s, cv.stride[1])
        if pr == 0 and qr == 0 and 0 <= p < P and 0 <= q < Q:
            poisoned[n0, p, q] = True
    assert poisoned.any(), "the case must put the Inf under an extra position"
    assert want.isfinite().all(1)[poisoned].all(), "F.conv2d is finite at the poisoned outputs"
    assert out.permute(0, 2, 3, 1)[poisoned].isnan().all(), "every channel of a poisoned output is NaN"
    keep = ~poisoned[:, None].expand_as(out)
    torch.testing.assert_close(out[keep], want[keep], **TOL[dtype], equal_nan=True)
