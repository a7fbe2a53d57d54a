"""Fused convolution + BatchNorm + residual + activation: one implicit-GEMM Triton kernel.

Computes, for a 4-D ``x`` (N, C, H, W) and ``weight`` (K, C/groups, R, S)::

    y = act(conv2d(x, weight, None, stride, padding, dilation, groups) * scale[k] + shift[k] (+ residual))

and replaces ``relu(bn(conv(x)) (+ residual))`` with an eval-mode BatchNorm
(``scale``/``shift`` from ``fastres.ops.bn_scale_shift``). The convolution is
never written to memory: it lives in the kernel's fp32 accumulator until the
epilogue has applied BN, residual and activation and cast once to ``x.dtype``.

Implicit GEMM, per group ``g``::

    out[m, k] = sum_{kred} A[m, kred] * B[kred, k]      m    = (n, p, q)   output pixel, M = N*P*Q
                                                        k    = output channel of group g, KG = K/groups
                                                        kred = (r, s, c), c fastest,    KRED = R*S*CG
    A[m, (r, s, c)] = x[n, g*CG + c, p*stride - pad + r*dil, q*stride - pad + s*dil]   (0 outside x)
    B[(r, s, c), k] = weight[g*KG + k, c, r, s]

Layouts. NHWC (channels_last) is native: within one (r, s) the reduction runs
over contiguous channels. ``x`` is made channels_last on the host (free if it
already is; a contiguous NCHW ``x`` costs one extra read and write of ``x``).
``weight`` is permuted once to [K, R, S, C/groups] (small). The output is
allocated in the memory format ``F.conv2d`` gives and stored through its
strides, so an NCHW output costs no extra pass: the epilogue
(``OUT_NHWC=False``) then works on the transposed [channel, pixel] tile, so
that neighbouring threads store neighbouring pixels (scalar but coalesced
stores). ``residual`` is read through its own strides, any layout, in the
output's orientation.

Reduction loop, two forms (``FLAT_K``, chosen per config by a heuristic):

* channel-tiled, when ``BLOCK_K`` divides C/groups: one loop over
  ``R*S*(CG/BLOCK_K)`` steps; each step is one (r, s) and a contiguous run of
  BLOCK_K channels, so the only mask is the per-pixel padding mask and the
  loads vectorize;
* flat, otherwise (the stem's C=3, ResNeXt's 4 or 8 channels per group): the
  index ``kred`` runs over all R*S*CG values in BLOCK_K steps and is decoded
  into (r, s, c) per element, so no tensor-core work is wasted on padding C up
  to BLOCK_K at each (r, s).

``IS_1X1`` (1x1, stride 1, no padding) drops the im2col arithmetic: row ``m``
of A starts at ``x + m*C + g*CG``, a plain GEMM with no spatial masks.

Precision: fp16/bf16 on tensor cores with fp32 accumulation; fp32 inputs use
TF32 when ``torch.backends.cudnn.allow_tf32`` is True (as cuDNN does) and exact
fp32 (``input_precision="ieee"``) otherwise; fp64 (gradcheck) runs an fp64
``tl.dot`` with an fp64 accumulator and epilogue (``out_dtype`` is passed: before
triton 3.8 it defaults to fp32 whatever the accumulator).

Address arithmetic is int64 wherever it scales with the batch (pixel rows of
``x``, ``residual`` and the output); per-image offsets and the weight stay
int32 (a single image or weight tensor above 2**31 elements is not supported).
"""
from typing import List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastres import _conv, _triton_env
from fastres.triton._utils import ACT_CODES, DOT_UPCAST_BF16, INTERPRET, apply_act, triton_custom_op, wrap


def _cfg(block_m, block_n, block_k, warps, stages, group_m=8):
    return triton.Config(
        {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": group_m},
        num_warps=warps, num_stages=stages,
    )


# Candidate tiles on a GPU; the pruner keeps those that fit and can help. Kept
# short: every surviving config is compiled once per constexpr specialization
# (about 7 for ResNet-50) and timed once per autotune key.
GPU_CONFIGS = [
    # wide layers (K >= 128): big tiles, 64-deep reduction steps
    _cfg(128, 256, 64, 8, 3),
    _cfg(256, 128, 64, 8, 3),
    _cfg(128, 128, 64, 8, 4),
    _cfg(128, 128, 32, 4, 4),
    _cfg(128, 64, 64, 4, 4),
    _cfg(64, 128, 64, 4, 4),
    _cfg(64, 64, 64, 4, 4),
    _cfg(64, 64, 32, 4, 5),
    # narrow outputs (stem and layer1, K=64) and small M (7x7 maps at small batch)
    _cfg(128, 32, 32, 4, 4),
    _cfg(64, 32, 32, 4, 4),
    # grouped convs (ResNeXt: 4..64 output channels per group) and flat reductions
    _cfg(256, 16, 32, 4, 3),
    _cfg(128, 16, 32, 4, 4),
    _cfg(64, 16, 16, 2, 4),
    _cfg(128, 64, 16, 4, 4),
]

# Under TRITON_INTERPRET=1 one small config: autotuning there is slow and means nothing.
# GROUP_M=2 so that the tests exercise the swizzle's ragged last group.
INTERPRET_CONFIGS = [_cfg(32, 16, 16, 4, 1, group_m=2)]

CONFIGS = INTERPRET_CONFIGS if INTERPRET else GPU_CONFIGS

# The autotune key: the conv geometry and a log2 bucket of M (not N, H, W), so
# a ResNet retunes only when the batch size crosses a power of two. The
# autotuner adds the dtypes of the tensor arguments itself.
TUNE_KEY = [
    "C", "KG", "GROUPS", "R", "S", "STRIDE_H", "STRIDE_W", "PAD_H", "PAD_W", "DIL_H", "DIL_W",
    "M_BUCKET", "HAS_RES", "OUT_NHWC", "INPUT_PRECISION",
]

_SMEM_FALLBACK = 232448  # an H100's opt-in shared memory per block, for non-CUDA pruning

# The register rules differ by Triton version (measured with
# scripts/triton_compile_check.py under 3.6 and 3.8): before 3.8 the transposed
# NCHW epilogue keeps more of the tile live, so NCHW outputs need smaller tiles.
_NCHW_TIGHT = _triton_env.version_tuple() < (3, 8)


def _smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (torch caches the properties)."""
    if device.type != "cuda":
        return _SMEM_FALLBACK
    return torch.cuda.get_device_properties(device).shared_memory_per_block_optin


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _is_flat(cg: int, block_k: int) -> bool:
    return cg % block_k != 0


def smem_bytes(cfg, elem: int, out_nhwc: bool = True) -> int:
    """The pruner's bound on the shared memory of ``cfg`` for ``elem``-byte inputs:
    ``num_stages`` buffers of an A and a B tile. On sm_90 the compiled kernel uses
    exactly this on the pipelined tensor-core paths and less elsewhere (checked by
    ``scripts/triton_compile_check.py``); the epilogue reuses the buffers. An NCHW
    output's transposed epilogue stages the fp32 tile (``BLOCK_M * BLOCK_N * 4``
    bytes) through them, which triton 3.6 allocates beyond them when they are smaller."""
    k = cfg.kwargs
    pipeline = (k["BLOCK_M"] * k["BLOCK_K"] + k["BLOCK_K"] * k["BLOCK_N"]) * elem * cfg.num_stages
    return pipeline if out_nhwc else max(pipeline, k["BLOCK_M"] * k["BLOCK_N"] * 4)


def fits_registers(cfg, args) -> bool:
    """Whether ``cfg``'s per-thread working set fits a thread's 255 registers for
    this specialization, i.e. ptxas (sm_90) spills little or nothing. Measured
    with ``scripts/triton_compile_check.py --full``; ``acc`` is the accumulator
    elements per thread:

    * fp64 (gradcheck only): two registers per element, acc <= 16;
    * exact fp32 (``ieee``) runs on FMA units, with its operands in registers
      too: acc <= 32; TF32: acc <= 64;
    * a residual read into an NCHW output tile costs one register per element
      (scalar loads): acc <= 64 (an NHWC residual is read vectorized and packed;
      128 spills a few hundred bytes there, once per tile, kept for the big GEMMs);
    * before triton 3.8 (3.6 measured) any NCHW output, TF32 included: acc <= 32
      (64 spills 0.4-2 KB there, 128 up to 8 KB; 3.8 spills none);
    * the flat reduction decodes (r, s, c) and a padding mask per element of the
      A tile: A elements per thread <= 32 and acc + A <= 96.
    """
    k = cfg.kwargs
    threads = 32 * cfg.num_warps
    acc = k["BLOCK_M"] * k["BLOCK_N"] // threads
    elem = args["x_ptr"].element_size()
    if args["IS_FP64"]:
        limit = 16
    elif _NCHW_TIGHT and not args["OUT_NHWC"]:
        limit = 32
    elif elem == 4:
        limit = 32 if args["INPUT_PRECISION"] == "ieee" else 64
    elif args["HAS_RES"] and not args["OUT_NHWC"]:
        limit = 64
    else:
        limit = 128
    a_elems = k["BLOCK_M"] * k["BLOCK_K"] // threads
    if _is_flat(args["CG"], k["BLOCK_K"]) and (a_elems > 32 or acc + a_elems > 96):
        return False
    return acc <= limit


def prune_configs(configs, named_args, **kwargs):
    """Drop the configs that cannot fit or cannot help for this conv.

    * shared memory: ``num_stages`` buffers of an A and a B tile must fit (``smem_bytes``);
    * registers: the tile must not spill much for this specialization (``fits_registers``);
    * ``BLOCK_N`` above the output channels per group (rounded up to a power
      of two, at least 16) only multiplies zeros;
    * ``BLOCK_K`` above the reduction length (flat form) or the channels per
      group (channel-tiled form: it must divide them, see ``_is_flat``) likewise;
    * ``BLOCK_M`` above the M bucket's size leaves whole rows idle.

    Never returns an empty list: if nothing survives, the smallest config does.
    """
    args = {**named_args, **kwargs}
    x = args["x_ptr"]
    elem = x.element_size()
    limit = _smem_limit(x.device)
    cg, kg, kred = args["CG"], args["KG"], args["CG"] * args["R"] * args["S"]
    max_n = max(16, _next_pow2(kg))
    max_m = max(16, 1 << args["M_BUCKET"])
    kept = []
    for cfg in configs:
        bm, bn, bk = cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.kwargs["BLOCK_K"]
        if smem_bytes(cfg, elem, args["OUT_NHWC"]) > limit or not fits_registers(cfg, args):
            continue
        if bn > max_n or bm > max_m:
            continue
        if _is_flat(cg, bk) and bk > max(16, _next_pow2(kred)):
            continue
        kept.append(cfg)
    if not kept:
        kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * c.kwargs["BLOCK_K"])]
    return kept


@triton.autotune(configs=CONFIGS, key=TUNE_KEY, prune_configs_by={"early_config_prune": prune_configs})
@triton.heuristics({"FLAT_K": lambda a: _is_flat(a["CG"], a["BLOCK_K"])})
@triton.jit
def _conv_bn_act_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, res_ptr, out_ptr,
    M, C, H, W, P, Q, CG, KG, GROUPS,
    srn, srk, srp, srq,  # residual strides (n, k, p, q)
    son, sok, sop, soq,  # output strides (n, k, p, q)
    M_BUCKET,  # autotune key only: ceil(log2(M))
    R: tl.constexpr, S: tl.constexpr,
    STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
    PAD_H: tl.constexpr, PAD_W: tl.constexpr,
    DIL_H: tl.constexpr, DIL_W: tl.constexpr,
    IS_1X1: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, OUT_NHWC: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr, IS_FP64: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    FLAT_K: tl.constexpr,
):
    """One [BLOCK_M pixels, BLOCK_N channels] output tile of one group (see the module docstring).

    ``x`` is dense NHWC; ``w`` is [K, R, S, CG] contiguous, i.e. a [K, KRED] matrix.
    """
    # Program -> (pixel tile, channel tile), GROUP_M pixel tiles sharing the weight tiles (L2 reuse).
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    tiles_per_group = tl.cdiv(KG, BLOCK_N)
    num_pid_in_group = GROUP_M * GROUPS * tiles_per_group
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m
    g = pid_n // tiles_per_group

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_kg = (pid_n % tiles_per_group) * BLOCK_N + tl.arange(0, BLOCK_N)  # channel within group
    offs_k = g * KG + offs_kg  # output channel
    m_ok = offs_m < M
    n_ok = offs_kg < KG
    q = offs_m % Q
    p = (offs_m // Q) % P
    n = offs_m // (Q * P)

    KRED = CG * R * S
    w_col = offs_k * KRED  # start of each output channel's weight row
    offs_r = tl.arange(0, BLOCK_K)
    if IS_1X1:
        # NHWC, stride 1, no padding: pixel m of the output reads pixel m of x.
        x_row = offs_m.to(tl.int64) * C + g * CG
        ih0 = p
        iw0 = q
    else:
        ih0 = p * STRIDE_H - PAD_H
        iw0 = q * STRIDE_W - PAD_W
        x_row = n.to(tl.int64) * (H * W * C) + (ih0 * W + iw0).to(tl.int64) * C + g * CG

    if IS_FP64:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)

    if FLAT_K:
        for k0 in range(0, KRED, BLOCK_K):
            kk = k0 + offs_r
            k_ok = kk < KRED
            if IS_1X1:
                a_ptrs = x_ptr + x_row[:, None] + kk[None, :]
                a_mask = m_ok[:, None] & k_ok[None, :]
            else:
                c = kk % CG
                rs = kk // CG
                r = rs // S
                s = rs % S
                ih = ih0[:, None] + (r * DIL_H)[None, :]
                iw = iw0[:, None] + (s * DIL_W)[None, :]
                a_ptrs = x_ptr + x_row[:, None] + ((r * (DIL_H * W) + s * DIL_W) * C + c)[None, :]
                a_mask = (m_ok[:, None] & k_ok[None, :]) & ((ih >= 0) & (ih < H) & (iw >= 0) & (iw < W))
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(w_ptr + w_col[None, :] + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)
    else:
        # BLOCK_K divides CG: each step is one (r, s) and BLOCK_K contiguous channels.
        NCB = CG // BLOCK_K
        for it in range(0, R * S * NCB):
            rs = it // NCB
            c0 = (it - rs * NCB) * BLOCK_K
            if IS_1X1:
                a_ptrs = x_ptr + (x_row + c0)[:, None] + offs_r[None, :]
                a_mask = m_ok[:, None]
            else:
                r = rs // S
                s = rs - r * S
                ih = ih0 + r * DIL_H
                iw = iw0 + s * DIL_W
                row_ok = m_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_ptrs = x_ptr + (x_row + ((r * (DIL_H * W) + s * DIL_W) * C + c0))[:, None] + offs_r[None, :]
                a_mask = row_ok[:, None]
            a = tl.load(a_ptrs, mask=a_mask, other=0.0)
            b = tl.load(w_ptr + (w_col + rs * CG + c0)[None, :] + offs_r[:, None], mask=n_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=INPUT_PRECISION, out_dtype=acc.dtype)

    # Epilogue, at accumulator precision: BN, residual, activation, one cast.
    scale = tl.load(scale_ptr + offs_k, mask=n_ok, other=0.0).to(acc.dtype)
    shift = tl.load(shift_ptr + offs_k, mask=n_ok, other=0.0).to(acc.dtype)
    z = acc * scale[None, :] + shift[None, :]
    m_row = n.to(tl.int64) * son + p.to(tl.int64) * sop + q.to(tl.int64) * soq  # output pixel offsets
    k64 = offs_k.to(tl.int64)
    if HAS_RES:
        r_row = n.to(tl.int64) * srn + p.to(tl.int64) * srp + q.to(tl.int64) * srq
    if OUT_NHWC:
        # [pixel, channel] tile, channels contiguous: vectorized along BLOCK_N.
        mask = m_ok[:, None] & n_ok[None, :]
        if HAS_RES:
            z += tl.load(res_ptr + r_row[:, None] + (k64 * srk)[None, :], mask=mask, other=0.0).to(acc.dtype)
        z = apply_act(z, ACT)
        tl.store(out_ptr + m_row[:, None] + (k64 * sok)[None, :], z.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # NCHW output: the transposed [channel, pixel] tile, so that neighbouring
        # threads hold neighbouring pixels (coalesced stores along q). In the
        # [pixel, channel] form the compiler gives each thread a column of
        # BLOCK_M pixels with BLOCK_M 64-bit addresses live at once (spills).
        zt = tl.trans(z)
        mask_t = n_ok[:, None] & m_ok[None, :]
        if HAS_RES:
            zt += tl.load(res_ptr + (k64 * srk)[:, None] + r_row[None, :], mask=mask_t, other=0.0).to(acc.dtype)
        zt = apply_act(zt, ACT)
        tl.store(out_ptr + (k64 * sok)[:, None] + m_row[None, :], zt.to(out_ptr.dtype.element_ty), mask=mask_t)


def _input_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision: for fp32, TF32 when cuDNN would use it
    (``torch.backends.cudnn.allow_tf32``), exact ("ieee") otherwise; fp64 is
    always exact; fp16/bf16 ignore it (Triton's default, "tf32", is passed)."""
    if dtype == torch.float64 or (dtype == torch.float32 and not torch.backends.cudnn.allow_tf32):
        return "ieee"
    return "tf32"


_INT32_SAFE = 2**31 - 1 - 1024  # int32 per-image/pixel-index arithmetic, with room for a last tile


def _prepare(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation):
    """The output tensor and the kernel's arguments (a dict; the launch grid needs the config)."""
    n, c, h, w = x.shape
    k, cg, r, s = weight.shape
    fmt = _conv.out_format(x, weight)
    _, _, p, q = _conv.out_shape(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty((n, k, p, q), device=x.device, dtype=x.dtype, memory_format=fmt)
    # NHWC x: no copy if it already is (an NCHW x costs one read + write here).
    x = x.contiguous(memory_format=torch.channels_last)
    weight = weight.permute(0, 2, 3, 1).contiguous()  # [K, R, S, C/groups]
    is_1x1 = r == 1 and s == 1 and tuple(stride) == (1, 1) and tuple(padding) == (0, 0)
    m = n * p * q
    if max(m, h * w * c, weight.numel()) > _INT32_SAFE:
        raise ValueError(
            f"conv_bn_act_triton: N*P*Q={m}, one image (H*W*C={h * w * c}) and the weight "
            f"({weight.numel()}) must each have at most {_INT32_SAFE} elements (int32 offsets); "
            "the batch as a whole may be larger"
        )
    args = dict(
        x_ptr=x, w_ptr=weight, scale_ptr=scale.contiguous(), shift_ptr=shift.contiguous(),
        res_ptr=residual, out_ptr=out,
        M=m, C=c, H=h, W=w, P=p, Q=q, CG=cg, KG=k // groups, GROUPS=groups,
        srn=0, srk=0, srp=0, srq=0,
        son=out.stride(0), sok=out.stride(1), sop=out.stride(2), soq=out.stride(3),
        M_BUCKET=max(m - 1, 0).bit_length(),
        R=r, S=s, STRIDE_H=stride[0], STRIDE_W=stride[1], PAD_H=padding[0], PAD_W=padding[1],
        DIL_H=dilation[0], DIL_W=dilation[1],
        IS_1X1=is_1x1, HAS_RES=residual is not None, ACT=ACT_CODES[activation],
        OUT_NHWC=fmt == torch.channels_last,
        INPUT_PRECISION=_input_precision(x.dtype),
        UPCAST=DOT_UPCAST_BF16 and x.dtype == torch.bfloat16,
        IS_FP64=x.dtype == torch.float64,
    )
    if residual is not None:
        args.update(srn=residual.stride(0), srk=residual.stride(1), srp=residual.stride(2), srq=residual.stride(3))
    return out, args


def _grid(args):
    def grid(meta):
        tiles_m = triton.cdiv(args["M"], meta["BLOCK_M"])
        return (tiles_m * args["GROUPS"] * triton.cdiv(args["KG"], meta["BLOCK_N"]),)

    return grid


def _conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation, config=None):
    """Launch; ``config`` (a ``triton.Config``) bypasses the autotuner (tests)."""
    out, args = _prepare(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation)
    if out.numel() == 0:
        return out
    if config is None:
        wrap(_conv_bn_act_kernel)[_grid(args)](**args)
    else:
        _conv_bn_act_kernel.fn[_grid(args)](
            **args, **config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages
        )
    return out


@triton_custom_op("fastres::conv_bn_act_triton")
def conv_bn_act_triton(
    x: Tensor,
    weight: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    stride: List[int],
    padding: List[int],
    dilation: List[int],
    groups: int,
    activation: str,
) -> Tensor:
    """``act(conv2d(x, weight) * scale[k] + shift[k] (+ residual))`` in one implicit-GEMM kernel.

    Arguments as validated by ``fastres.ops._check_conv_bn_act``; the output
    has ``x``'s dtype and ``F.conv2d``'s memory format.
    """
    return _conv_bn_act(x, weight, scale, shift, residual, stride, padding, dilation, groups, activation)
