"""The Hopper (sm_90a) kernels of ``conv_bn_act_cuda`` (csrc/cuda/conv_bn_act_sm90*,
docs/cuda_conv.md, "Hopper kernels"): CUTLASS 3.x TMA + WGMMA convolutions with
the BN / residual / activation epilogue as an epilogue visitor tree.

Without a GPU (CI), from the build and CUTLASS's host code:

* the machine code: each of the four kernels (float16/bfloat16 x 128x128/128x64)
  holds warpgroup MMAs (``HGMMA``) and TMA loads (``UTMALDG``), whose waits are
  not serialized one per MMA, no local memory (spills) and a stack of 0; the
  CTA's shared memory fits sm_90's 227 KiB;
* the routing rule (``_conv_bn_act_cuda_kernel``) on every conv of ResNet-18 to
  -152, ResNeXt-50/101 and Wide ResNet-50/101 at batch 1 to 256, and its
  refusals, each with a reason;
* the problem CUTLASS receives (``_conv_bn_act_cuda_sm90_plan``): GEMM extents
  and output size against ``F.conv2d``'s, workspace, can_implement agreeing with
  the routing rule.

On an sm_90 GPU: the kernels against ``fastres.reference.conv_bn_act``, each
tile forced, every epilogue, partial tiles (tests/test_cuda_conv.py runs the
model convs through the routing rule, which sends them here).
"""
import os
import re
import shutil
import subprocess

import pytest
import torch
import torch.nn.functional as F

from fastres import _extension, ops, reference, shapes
from conftest import ACTIVATIONS, conv_inputs
from conftest import ConvCase as Conv

BUILT = _extension.LOADED and hasattr(torch.ops.fastres, "_conv_bn_act_cuda_sm90_plan")
needs_sm90_build = pytest.mark.skipif(
    not BUILT, reason="fastres._C has no Hopper conv kernels (no CUTLASS, or TORCH_CUDA_ARCH_LIST without 9.0/9.0a)"
)
ON_SM90 = BUILT and torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
needs_sm90_gpu = pytest.mark.skipif(not ON_SM90, reason="needs an sm_90 GPU (H100/H200) and the Hopper kernels")

DTYPES16 = [torch.float16, torch.bfloat16]
H100_SMS = 132
SM90_SMEM_LIMIT = 227 * 1024  # bytes of shared memory one CTA may use on sm_90
TILES = {0: "sm90-128x128", 1: "sm90-128x64"}

ARCHS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d",
         "wide_resnet50_2", "wide_resnet101_2"]
BATCHES = [1, 8, 64, 256]


def _geometries():
    """Every distinct conv of ARCHS at BATCHES: (label, ConvCase)."""
    seen = {}
    for arch in ARCHS:
        for batch in BATCHES:
            for cs in shapes.conv_shapes(arch, batch=batch):
                seen.setdefault(Conv.of(cs, batch), f"{arch}:b{batch}:{cs.label}")
    return [(label, cv) for cv, label in seen.items()]


GEOMETRIES = _geometries()


def _kernel(dtype, cv: Conv, major=9, sms=H100_SMS):
    """The routing rule's kernel for `cv` on a GPU of compute capability `major`.x."""
    return torch.ops.fastres._conv_bn_act_cuda_kernel(
        dtype, cv.n, cv.c, cv.h, cv.w, cv.k, cv.r, cv.s, *cv.conv_args(), major, sms)


def _out_pq(cv: Conv):
    return cv.out_shape()[2:]


def _sm90_reason(dtype, c, k, r=3, s=3, h=14, w=14, stride=1, padding=1, dilation=1, groups=1, major=9):
    def pair(v):
        return list(v) if isinstance(v, (tuple, list)) else [v, v]

    return torch.ops.fastres._conv_bn_act_cuda_sm90_unsupported(
        dtype, c, h, w, k, r, s, pair(stride), pair(padding), pair(dilation), groups, major)


def _plan(dtype, tile, n, c, h, w, k, r, s, stride, padding, dilation):
    def pair(v):
        return list(v) if isinstance(v, (tuple, list)) else [v, v]

    keys = ("implementable", "workspace", "gemm_m", "gemm_n", "gemm_k", "out_n", "out_p", "out_q", "out_k",
            "smem", "threads", "stages", "cluster_m")
    values = torch.ops.fastres._conv_bn_act_cuda_sm90_plan(
        dtype, tile, n, c, h, w, k, r, s, pair(stride), pair(padding), pair(dilation))
    return dict(zip(keys, values))


# ---------------------------------------------------------------------------
# The machine code.
# ---------------------------------------------------------------------------


def _cuobjdump():
    """cuobjdump from the CUDA toolkit, else the one triton's wheel ships."""
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidates = [os.path.join(home, "bin", "cuobjdump"), shutil.which("cuobjdump")]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


SM90_KERNEL = re.compile(r"_ZN7cutlass13device_kernelINS_4conv6kernel13ConvUniversal\w*ResidualActFn\w*")


@pytest.fixture(scope="module")
def sm90_sass():
    """{kernel name: (SASS text, resource-usage line)} of the Hopper kernels in fastres._C."""
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's wheel)")
    import fastres._C as ext

    sass = subprocess.run([tool, "-sass", "-arch", "sm_90a", ext.__file__], capture_output=True, text=True,
                          check=True).stdout
    usage = subprocess.run([tool, "-res-usage", "-arch", "sm_90a", ext.__file__], capture_output=True, text=True,
                           check=True).stdout
    functions = {}
    for block in re.split(r"\n\s*Function : ", sass)[1:]:
        name = block.split("\n", 1)[0].strip()
        if SM90_KERNEL.fullmatch(name):
            functions[name] = [block, None]
    for name, line in re.findall(r"Function (\S+):\n\s*(REG:.*)", usage):
        if name in functions:
            functions[name][1] = line
    return functions


@needs_sm90_build
def test_four_sm90_kernels_in_the_binary(sm90_sass):
    """float16 and bfloat16 x 128x128 and 128x64, each compiled for sm_90a."""
    assert len(sm90_sass) == 4, sorted(sm90_sass)
    assert sum("bfloat16_t" in n for n in sm90_sass) == 2 and sum("half_t" in n for n in sm90_sass) >= 2


@needs_sm90_build
def test_sm90_kernels_use_wgmma_and_tma_without_spills(sm90_sass):
    for name, (sass, usage) in sm90_sass.items():
        hgmma = len(re.findall(r"\bHGMMA\.", sass))
        assert hgmma > 0, f"{name}: no warpgroup MMA (HGMMA): not a Hopper-native mainloop"
        assert re.search(r"\bUTMALDG\.[\w.]*IM2COL", sass), f"{name}: no im2col TMA load (UTMALDG) of the activations"
        assert re.search(r"\bUTMALDG\.", sass) and re.search(r"\bUTMASTG\.", sass), f"{name}: no TMA load/store"
        # ptxas serializes wgmma across a function call (warning C7510): a wait
        # after every MMA instead of one per k-block.
        depbar = len(re.findall(r"WARPGROUP\.DEPBAR", sass))
        assert depbar < hgmma / 2, f"{name}: {depbar} warpgroup waits for {hgmma} HGMMAs (serialized wgmma)"
        assert not re.search(r"\b(LDL|STL)(\.|\s)", sass), f"{name}: local-memory loads/stores (register spills)"
        assert usage is not None, f"{name}: no resource usage reported"
        assert re.search(r"STACK:0\b", usage) and re.search(r"LOCAL:0\b", usage), f"{name}: {usage}"


@needs_sm90_build
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
@pytest.mark.parametrize("tile", sorted(TILES))
def test_sm90_cta_resources(tile, dtype):
    """Shared memory per CTA (mainloop stages + epilogue) within sm_90's 227 KiB;
    one producer and one consumer warpgroup; a 2x1 cluster."""
    plan = _plan(dtype, tile, 8, 256, 14, 14, 256, 3, 3, 1, 1, 1)
    assert plan["implementable"]
    assert 0 < plan["smem"] <= SM90_SMEM_LIMIT, plan
    assert plan["stages"] >= 4, plan
    assert plan["threads"] == 256 and plan["cluster_m"] == 2, plan


# ---------------------------------------------------------------------------
# The routing rule.
# ---------------------------------------------------------------------------


def _expected_kernel(dtype, cv):
    """The kernel family the routing rule must pick (docs/cuda_conv.md, "Which shapes go where")."""
    if cv.groups > 1:  # the Sm80 grouped rule: C/groups and K/groups multiples of one k-tile and N-tile
        cg, kg = cv.c // cv.groups, cv.k // cv.groups
        fits = cg % 16 == 0 and kg % 64 == 0 if dtype == torch.float32 else cg % 32 == 0 and kg % 32 == 0
        return ("sm80 tf32" if dtype == torch.float32 else "sm80") if fits else "unsupported"
    if dtype == torch.float32:
        return "sm80 tf32"
    if cv.c <= 4:
        return "sm80 stem"
    return "sm90"


@needs_sm90_build
@pytest.mark.parametrize("dtype", [*DTYPES16, torch.float32], ids=str)
def test_routing_every_resnet_conv(dtype):
    """On an H100 (9.0, 132 SMs): every dense 16-bit conv but the stem takes an sm90
    kernel; the stem the Sm80 fixed-channels kernel; ResNeXt's grouped convs the
    Sm80 grouped kernels (or another backend); float32 the Sm80 TF32 kernel."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = True
    try:
        for label, cv in GEOMETRIES:
            kernel = _kernel(dtype, cv)
            assert kernel.startswith(_expected_kernel(dtype, cv)), f"{label} {dtype}: {kernel}"
            if kernel.startswith("sm90"):
                p, q = _out_pq(cv)
                wide = cv.k % 128 == 0 and -(-cv.n * p * q // 128) * (cv.k // 128) >= H100_SMS
                assert ("128x128x64" in kernel) == wide, f"{label}: {kernel}"
    finally:
        torch.backends.cudnn.allow_tf32 = saved


@needs_sm90_build
def test_routing_off_hopper_stays_sm80():
    for label, cv in GEOMETRIES:
        kernel = _kernel(torch.bfloat16, cv, major=8, sms=108)
        assert kernel.startswith("sm80") or kernel.startswith("unsupported"), f"{label}: {kernel}"


@needs_sm90_build
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dtype=torch.float16, c=64, k=64, major=8), "only on compute capability 9"),
        (dict(dtype=torch.float32, c=64, k=64), "Sm80 TF32"),
        (dict(dtype=torch.bfloat16, c=1024, k=1024, groups=32), "no grouped convolution"),
        (dict(dtype=torch.float16, c=3, k=64, r=7, s=7, stride=2, padding=3), "fixed-channels"),
        (dict(dtype=torch.float16, c=12, k=64), "C and K multiples of 8"),
        (dict(dtype=torch.bfloat16, c=64, k=20), "C and K multiples of 8"),
        (dict(dtype=torch.float16, c=64, k=64, padding=130, h=300, w=300), "corners"),
        (dict(dtype=torch.float16, c=64, k=64, r=1, s=1, padding=0, dilation=1, stride=9, h=64, w=64), "strides"),
        (dict(dtype=torch.float16, c=64, k=64, dilation=128, padding=128, h=300, w=300), "filter offsets"),
    ],
)
def test_sm90_refusals_name_a_reason(kwargs, match):
    assert re.search(match, _sm90_reason(**kwargs)), _sm90_reason(**kwargs)


@needs_sm90_build
def test_sm90_refusal_of_what_no_cuda_kernel_runs():
    """A conv the whole backend refuses reports that reason first."""
    assert "float64" in _sm90_reason(torch.float64, 64, 64)


@needs_sm90_build
def test_kernel_names_listed_by_info():
    kernels = _extension.cuda_conv_kernels()
    assert "sm90 128x128x64 cluster 2x1x1" in kernels and "sm90 128x64x64 cluster 2x1x1" in kernels
    assert sum(k.startswith("sm80") for k in kernels) == 6
    import fastres

    assert fastres.info()["cuda_conv_kernels"] == kernels


@needs_sm90_build
def test_cuda_conv_kernel_asks_the_device(monkeypatch):
    """fastres._extension.cuda_conv_kernel (the benchmark's "cuda kernel" column) asks
    the rule with the device's capability and SM count."""
    class Props:
        multi_processor_count = H100_SMS

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index=None: Props())
    args = (256, 56, 56, 256, 1, 1, (1, 1), (0, 0), (1, 1), 1, torch.device("cuda", 0))
    assert _extension.cuda_conv_kernel(torch.bfloat16, 64, *args) == "sm90 128x128x64 cluster 2x1x1"
    assert _extension.cuda_conv_kernel(torch.bfloat16, 1, *args) == "sm90 128x64x64 cluster 2x1x1"
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    assert _extension.cuda_conv_kernel(torch.bfloat16, 64, *args).startswith("sm80")


# ---------------------------------------------------------------------------
# The problem CUTLASS receives.
# ---------------------------------------------------------------------------


def _conv2d_out(n, c, h, w, k, r, s, stride, padding, dilation):
    x = torch.empty(n, c, h, w, device="meta")
    wt = torch.empty(k, c, r, s, device="meta")
    return tuple(F.conv2d(x, wt, None, stride, padding, dilation).shape)


@needs_sm90_build
@pytest.mark.parametrize("dtype", DTYPES16, ids=str)
def test_problem_shape_matches_conv2d(dtype):
    """For every sm90-routed ResNet conv: CUTLASS derives F.conv2d's output size,
    the implicit GEMM M = N*P*Q, N = K, K = R*S*C, needs no workspace, and its
    can_implement accepts what the routing rule sends it."""
    for label, cv in GEOMETRIES:
        if not _kernel(dtype, cv).startswith("sm90"):
            continue
        args = (cv.n, cv.c, cv.h, cv.w, cv.k, cv.r, cv.s, cv.stride, cv.padding, cv.dilation)
        n, k, p, q = _conv2d_out(*args)
        for tile in TILES:
            plan = _plan(dtype, tile, *args)
            assert plan["implementable"], f"{label} {TILES[tile]}: CUTLASS's can_implement refuses it"
            assert (plan["out_n"], plan["out_p"], plan["out_q"], plan["out_k"]) == (n, p, q, k), label
            assert (plan["gemm_m"], plan["gemm_n"], plan["gemm_k"]) == (n * p * q, k, cv.r * cv.s * cv.c), label
            assert plan["workspace"] == 0, label


# Odd geometries the rule accepts (asymmetric windows, strides and padding,
# floor division of the output size, dilation, partial tiles) and ones at the
# edge of the TMA limits: the rule and CUTLASS's can_implement must agree.
EDGE = [
    # n, c, h, w, k, r, s, stride, padding, dilation
    (1, 8, 7, 9, 8, 3, 3, 1, 1, 1),
    (3, 16, 9, 9, 24, 1, 1, 2, 0, 1),
    (2, 40, 11, 11, 72, 3, 3, 1, 2, 2),
    (2, 16, 8, 10, 16, 1, 3, (2, 1), (0, 1), 1),
    (1, 64, 9, 9, 64, 3, 3, 1, (1, 2), (1, 2)),
    (2, 24, 12, 13, 40, 5, 5, 3, 2, 1),
    (1, 8, 20, 20, 8, 3, 3, 8, 1, 1),
    (1, 8, 300, 300, 8, 3, 3, 1, 128, 1),
    (1, 8, 300, 300, 8, 3, 3, 1, 0, 127),
    (1, 8, 300, 300, 8, 1, 1, 1, 127, 1),
]


@needs_sm90_build
@pytest.mark.parametrize("geom", EDGE, ids=str)
def test_rule_agrees_with_can_implement(geom):
    n, c, h, w, k, r, s, stride, padding, dilation = geom

    def pair(v):
        return v if isinstance(v, tuple) else (v, v)

    reason = torch.ops.fastres._conv_bn_act_cuda_sm90_unsupported(
        torch.float16, c, h, w, k, r, s, list(pair(stride)), list(pair(padding)), list(pair(dilation)), 1, 9)
    for tile in TILES:
        plan = _plan(torch.float16, tile, n, c, h, w, k, r, s, stride, padding, dilation)
        assert plan["implementable"] == (reason == ""), f"{geom} {TILES[tile]}: rule {reason!r} vs CUTLASS {plan}"
        if plan["implementable"]:
            assert (plan["out_n"], plan["out_k"], plan["out_p"], plan["out_q"]) == _conv2d_out(
                n, c, h, w, k, r, s, pair(stride), pair(padding), pair(dilation))


@needs_sm90_build
def test_plan_argument_errors():
    with pytest.raises(ValueError, match="`tile` 0"):
        _plan(torch.float16, 2, 1, 8, 8, 8, 8, 3, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="float16 or bfloat16"):
        _plan(torch.float32, 0, 1, 8, 8, 8, 8, 3, 3, 1, 1, 1)
    with pytest.raises(ValueError, match="non-empty output"):
        _plan(torch.float16, 0, 1, 8, 2, 2, 8, 3, 3, 1, 0, 1)


@needs_sm90_build
def test_forced_sm90_tile_on_a_shape_it_cannot_run(monkeypatch):
    """FASTRES_CUDA_CONV_TILE=sm90-* on a conv the sm90 kernels refuse names why."""
    if not torch.cuda.is_available():
        pytest.skip("the op needs a GPU; the rule is checked above")
    cv = Conv(2, 3, 17, 19, 16, 7, 7, (2, 2), (3, 3))
    x, w, scale, shift, r = conv_inputs(cv, torch.float16, "nhwc", False, None, device="cuda")
    monkeypatch.setenv("FASTRES_CUDA_CONV_TILE", "sm90-128x128")
    with pytest.raises(ValueError, match="forces an sm90 tile"):
        ops.conv_bn_act(x, w, scale, shift, None, stride=cv.stride, padding=cv.padding, backend="cuda")


# ---------------------------------------------------------------------------
# On an sm_90 GPU.
# ---------------------------------------------------------------------------

TOL = {torch.float16: dict(rtol=2e-3, atol=2e-3), torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2)}

GPU_CASES = {
    "c64k64-3x3": Conv(2, 64, 14, 14, 64, 3, 3, padding=(1, 1)),
    "c64k256-1x1": Conv(4, 64, 14, 14, 256, 1, 1),
    "c256k128-1x1s2": Conv(3, 256, 15, 15, 128, 1, 1, (2, 2)),
    "c40k72-d2": Conv(2, 40, 11, 11, 72, 3, 3, padding=(2, 2), dilation=(2, 2)),
    "c16k16-1x3s21": Conv(2, 16, 8, 10, 16, 1, 3, (2, 1), (0, 1)),
    "c24k40-5x5s3": Conv(2, 24, 12, 13, 40, 5, 5, (3, 3), (2, 2)),
    "c128k136-odd": Conv(1, 128, 7, 9, 136, 3, 3, padding=(1, 1)),
}


@pytest.fixture
def _exact_fp32_reference():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@needs_sm90_gpu
@pytest.mark.usefixtures("_exact_fp32_reference")
@pytest.mark.parametrize("fmt", ["nhwc", "nchw"])
@pytest.mark.parametrize("tile", sorted(TILES.values()))
@pytest.mark.parametrize("name", GPU_CASES)
def test_sm90_kernel_matches_reference(name, tile, fmt, monkeypatch):
    cv = GPU_CASES[name]
    monkeypatch.setenv("FASTRES_CUDA_CONV_TILE", tile)
    for dtype in DTYPES16:
        x, w, scale, shift, r = conv_inputs(cv, dtype, fmt, True, None, device="cuda")
        assert _kernel(dtype, cv).startswith("sm90"), name
        conv = F.conv2d(x.float(), w.float(), None, *cv.conv_args())
        for with_res in (False, True):
            for act in ACTIVATIONS:
                rr = r if with_res else None
                out = ops.conv_bn_act(x, w, scale, shift, rr, stride=cv.stride, padding=cv.padding,
                                      dilation=cv.dilation, activation=act, backend="cuda")
                want = reference.bn_act(conv, scale, shift, None if rr is None else rr.float(), act).to(dtype)
                torch.testing.assert_close(out, want, **TOL[dtype], msg=lambda m: f"{name} {tile} {act}: {m}")


@needs_sm90_gpu
def test_sm90_nan_propagates_through_relu(monkeypatch):
    cv = GPU_CASES["c64k64-3x3"]
    x, w, scale, shift, _ = conv_inputs(cv, torch.bfloat16, "nhwc", False, None, device="cuda")
    x[0, 5, 3, 3] = float("nan")
    out = ops.conv_bn_act(x, w, scale, shift, None, stride=cv.stride, padding=cv.padding, activation="relu",
                          backend="cuda")
    want = torch.relu(reference.bn_act(F.conv2d(x.float(), w.float(), None, *cv.conv_args()), scale, shift, None,
                                       "identity"))
    assert torch.equal(out.isnan(), want.isnan())

