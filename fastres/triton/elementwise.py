"""Triton kernels for the elementwise op families ``add_act`` and ``bn_act``.

Kernels first, then the host launchers, each launcher defining one custom op
``torch.ops.fastres.<name>`` (fake kernels and autograd: ``fastres/ops.py``).

Conventions shared by every kernel here:

* Math runs in fp32 (fp64 when ``x`` is fp64, so gradcheck sees fp64 all the
  way: the ``FP64`` constexpr), and each output is rounded once, on store.
* Offsets are int64 (``tl.program_id(0).to(tl.int64)``): tensors of more than
  2**31 elements index correctly. Every grid is 1-D, on axis 0 (up to 2**31 - 1
  programs), and every tail is masked.
* Layout: the launcher makes ``x`` dense (``_layout.dense``), gives ``grad`` and
  ``residual`` exactly ``x``'s strides (``_layout.like``) and allocates outputs
  with ``torch.empty_like(x)``, so all tensors share one memory order. The
  4-D kernels view that memory as a row-major matrix ``[R, K]``:

  - NCHW: ``R = N*C`` planes, ``K = H*W``; the channel of row ``r`` is ``r % C``;
  - NHWC: ``R = N*H*W`` pixels, ``K = C``; the channel of column ``k`` is ``k``
    (also used for ``H*W == 1``, where both orders are the same memory).

  Tiles are ``[BLOCK_R, BLOCK_K]`` with ``BLOCK_K`` along the contiguous
  dimension (coalesced, vectorizable when ``K`` is a multiple of 16, which
  Triton specializes on), and ``scale``/``shift`` are loaded once per tile as
  a vector, never per element.
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from fastres import _layout
from fastres.triton._utils import ACT_CODES, act_grad, apply_act, triton_custom_op, wrap

# ----------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------


@triton.jit
def _to_compute(v, FP64: tl.constexpr):
    """``v`` in the compute dtype: fp64 if ``FP64`` else fp32."""
    if FP64:
        return v.to(tl.float64)
    else:
        return v.to(tl.float32)


@triton.jit
def _zeros(BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, FP64: tl.constexpr):
    if FP64:
        return tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float64)
    else:
        return tl.zeros([BLOCK_R, BLOCK_K], dtype=tl.float32)


@triton.jit
def _add_act_fwd_kernel(x_ptr, r_ptr, y_ptr, n, ACT: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr):
    """``y = act(x + r)`` over ``n`` elements stored alike (flat, any rank).

    Replaces ``torch.relu(x.float() + r.float()).to(x.dtype)`` (or silu/identity):
    one read of each input, one write, instead of two kernels and an fp32
    intermediate.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    r = tl.load(r_ptr + offs, mask=mask)
    y = apply_act(_to_compute(x, FP64) + _to_compute(r, FP64), ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _add_act_bwd_kernel(
    g_ptr, x_ptr, r_ptr, gz_ptr, n, ACT: tl.constexpr, FP64: tl.constexpr, BLOCK: tl.constexpr
):
    """``gz = g * act'(x + r)``, the gradient of both ``x`` and ``r``.

    Replaces autograd's ``threshold_backward(g, relu(x + r), 0)`` /
    ``silu_backward(g, x + r)`` after recomputing ``x + r``. For ``identity`` it
    is a copy of ``g`` and ``x``, ``r`` are not read.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = _to_compute(tl.load(g_ptr + offs, mask=mask), FP64)
    if ACT != 0:
        x = tl.load(x_ptr + offs, mask=mask)
        r = tl.load(r_ptr + offs, mask=mask)
        g = act_grad(_to_compute(x, FP64) + _to_compute(r, FP64), g, ACT)
    tl.store(gz_ptr + offs, g.to(gz_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_fwd_kernel(
    x_ptr, scale_ptr, shift_ptr, r_ptr, y_ptr,
    R, K, C, num_k_blocks,
    CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, ACT: tl.constexpr, FP64: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``y = act(x * scale[c] + shift[c] (+ r))`` on one ``[BLOCK_R, BLOCK_K]`` tile of ``[R, K]``.

    Replaces ``act(x.float() * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    (+ r.float())).to(x.dtype)``, i.e. eval-mode ``F.batch_norm`` followed by the
    residual add and the activation: one read of ``x`` (and ``r``), one write.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_r = pid // num_k_blocks
    pid_k = pid % num_k_blocks
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    rmask = rows < R
    kmask = cols < K
    mask = rmask[:, None] & kmask[None, :]
    offs = rows[:, None] * K + cols[None, :]
    if CHANNELS_LAST:  # channel = column
        s = _to_compute(tl.load(scale_ptr + cols, mask=kmask), FP64)[None, :]
        b = _to_compute(tl.load(shift_ptr + cols, mask=kmask), FP64)[None, :]
    else:  # channel = row % C, in int32 from the tile's first row
        c0 = ((pid_r * BLOCK_R) % C).to(tl.int32)
        ch = (c0 + tl.arange(0, BLOCK_R)) % C
        s = _to_compute(tl.load(scale_ptr + ch, mask=rmask), FP64)[:, None]
        b = _to_compute(tl.load(shift_ptr + ch, mask=rmask), FP64)[:, None]
    z = _to_compute(tl.load(x_ptr + offs, mask=mask), FP64) * s + b
    if HAS_RES:
        z += _to_compute(tl.load(r_ptr + offs, mask=mask), FP64)
    y = apply_act(z, ACT)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bn_act_bwd_kernel(
    g_ptr, x_ptr, scale_ptr, shift_ptr, r_ptr, gx_ptr, gz_ptr, y_ptr, part_scale_ptr, part_shift_ptr,
    R, K, C, num_c_blocks, num_k_tiles, num_tiles, tiles_per_prog,
    CHANNELS_LAST: tl.constexpr, HAS_RES: tl.constexpr, STORE_GZ: tl.constexpr, STORE_Y: tl.constexpr,
    ACT: tl.constexpr, FP64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """The whole ``bn_act`` backward in one pass over the data, for one block of channels.

    With ``z = x * scale[c] + shift[c] (+ r)`` and ``gz = g * act'(z)``::

        grad_x = gz * scale[c]                    (stored, x dtype)
        grad_z = gz                               (stored if STORE_GZ: the residual's grad)
        y = act(z)                                (stored if STORE_Y: the forward output, recomputed
                                                   for the weight gradient of the conv it feeds)
        part_scale[p, c] = sum over p's tiles of gz * x
        part_shift[p, c] = sum over p's tiles of gz

    Pointers a launch does not use (``r_ptr`` without residual, ``gz_ptr``
    without STORE_GZ, ``y_ptr`` without STORE_Y) are None, never an alias of
    another argument.

    Program ``pid`` handles channel block ``pid % num_c_blocks`` and the tiles
    ``[p * tiles_per_prog, (p + 1) * tiles_per_prog)`` of that block, with
    ``p = pid // num_c_blocks``. It accumulates elementwise in a tile-shaped
    register accumulator and reduces it once at the end, so the partials are
    deterministic (no atomics); the launcher sums them over ``p``. Tiles:

    * NHWC (``CHANNELS_LAST``): channels are the ``BLOCK_K`` columns, tile ``t``
      is rows ``[t * BLOCK_R, (t + 1) * BLOCK_R)`` of ``[R = N*H*W, K = C]``;
    * NCHW: channels are the ``BLOCK_R`` rows, tile ``t`` is image
      ``n = t // num_k_tiles``, pixels ``[kt * BLOCK_K, (kt + 1) * BLOCK_K)`` with
      ``kt = t % num_k_tiles``, of ``[R = N*C, K = H*W]``.

    Replaces autograd through ``act(x * scale + shift (+ r))``: the activation
    backward, ``grad * scale``, and two ``sum(dim=(0, 2, 3))`` reductions, i.e.
    four or five passes and an fp32 temporary.
    """
    pid = tl.program_id(0).to(tl.int64)
    part = pid // num_c_blocks
    cb = pid % num_c_blocks
    t_start = part * tiles_per_prog
    t_end = tl.minimum(t_start + tiles_per_prog, num_tiles)
    if CHANNELS_LAST:
        ch = cb * BLOCK_K + tl.arange(0, BLOCK_K)
        cmask = ch < C
        s = _to_compute(tl.load(scale_ptr + ch, mask=cmask, other=0.0), FP64)[None, :]
        b = _to_compute(tl.load(shift_ptr + ch, mask=cmask, other=0.0), FP64)[None, :]
    else:
        ch = cb * BLOCK_R + tl.arange(0, BLOCK_R)
        cmask = ch < C
        s = _to_compute(tl.load(scale_ptr + ch, mask=cmask, other=0.0), FP64)[:, None]
        b = _to_compute(tl.load(shift_ptr + ch, mask=cmask, other=0.0), FP64)[:, None]
    acc_scale = _zeros(BLOCK_R, BLOCK_K, FP64)
    acc_shift = _zeros(BLOCK_R, BLOCK_K, FP64)
    for t in range(t_start, t_end):
        if CHANNELS_LAST:
            rows = t * BLOCK_R + tl.arange(0, BLOCK_R)
            mask = (rows < R)[:, None] & cmask[None, :]
            offs = rows[:, None] * K + ch[None, :]
        else:
            n = t // num_k_tiles
            cols = (t % num_k_tiles) * BLOCK_K + tl.arange(0, BLOCK_K)
            mask = cmask[:, None] & (cols < K)[None, :]
            offs = (n * C + ch)[:, None] * K + cols[None, :]
        x = _to_compute(tl.load(x_ptr + offs, mask=mask, other=0.0), FP64)
        g = _to_compute(tl.load(g_ptr + offs, mask=mask, other=0.0), FP64)
        if ACT != 0 or STORE_Y:  # identity needs neither z nor the residual, unless y is stored
            z = x * s + b
            if HAS_RES:
                z += _to_compute(tl.load(r_ptr + offs, mask=mask, other=0.0), FP64)
            g = act_grad(z, g, ACT)
            if STORE_Y:
                tl.store(y_ptr + offs, apply_act(z, ACT).to(y_ptr.dtype.element_ty), mask=mask)
        g = tl.where(mask, g, 0.0)
        tl.store(gx_ptr + offs, (g * s).to(gx_ptr.dtype.element_ty), mask=mask)
        if STORE_GZ:
            tl.store(gz_ptr + offs, g.to(gz_ptr.dtype.element_ty), mask=mask)
        acc_scale += g * x
        acc_shift += g
    if CHANNELS_LAST:
        ps = tl.sum(acc_scale, axis=0)
        pb = tl.sum(acc_shift, axis=0)
    else:
        ps = tl.sum(acc_scale, axis=1)
        pb = tl.sum(acc_shift, axis=1)
    tl.store(part_scale_ptr + part * C + ch, ps, mask=cmask)
    tl.store(part_shift_ptr + part * C + ch, pb, mask=cmask)


# ----------------------------------------------------------------------------
# Tile choices (host side)
# ----------------------------------------------------------------------------

_BLOCK_1D = 4096  # elements per program of the flat kernels: 16 per thread at 8 warps
_TILE = 4096  # target elements per 2-D forward tile: 16 per thread at 8 warps
# The backward keeps two tile-shaped accumulators and the channel vectors in
# registers: at 16 elements per thread it needs 120-160 registers (sm_90,
# ptxas -v), one or two programs per SM; at 8 per thread, 60-100 (3-4 per SM).
_TILE_BWD = 2048
_BLOCK_K_MAX = 256  # widest tile along the contiguous dimension
_BLOCK_K_MIN = 32  # narrowest, when K allows: >= 64 contiguous bytes per row segment
# Programs of the bn_act backward: enough to fill an H100 (132 SMs) several
# times over, few enough that each program streams many tiles and the partials
# stay a small fraction of the data. A constant (not the SM count), so the
# summation order, hence the result, is the same on every GPU.
_BWD_PROGRAMS = 1024


def _num_warps(elements: int, per_thread: int = 16) -> int:
    """Warps for a tile of ``elements``: ``per_thread`` elements per thread, 1 to 8 warps."""
    return max(1, min(8, elements // (32 * per_thread)))


def _block_k(k: int) -> int:
    """A power of two covering the contiguous dimension ``k`` with little masked waste.

    The widest of ``[_BLOCK_K_MIN, _BLOCK_K_MAX]`` (or ``next_pow2(k)`` when
    smaller) that minimizes the padding ``ceil(k / b) * b - k``: e.g. 49 -> 64,
    196 -> 32 (224 lanes instead of 256), 3136 -> 64 (no waste).
    """
    top = min(triton.next_power_of_2(k), _BLOCK_K_MAX)
    best, padded = top, triton.cdiv(k, top) * top
    b = top // 2
    while b >= _BLOCK_K_MIN:
        p = triton.cdiv(k, b) * b
        if p < padded:
            best, padded = b, p
        b //= 2
    return best


def _matrix(x: Tensor) -> Tuple[bool, int, int, int]:
    """``(channels_last, R, K, C)``: the ``[R, K]`` matrix view of dense 4-D ``x``."""
    n, c, h, w = x.shape
    if _layout.is_channels_last(x) or h * w == 1:
        return True, n * h * w, c, c
    return False, n * c, h * w, c


def _flat_launch(kernel, tensors, n: int, activation: str, fp64: bool) -> None:
    block = min(_BLOCK_1D, triton.next_power_of_2(n))
    wrap(kernel)[(triton.cdiv(n, block),)](
        *tensors, n, ACT=ACT_CODES[activation], FP64=fp64, BLOCK=block, num_warps=_num_warps(block)
    )


# ----------------------------------------------------------------------------
# Launchers: the custom ops
# ----------------------------------------------------------------------------


@triton_custom_op("fastres::add_act_triton")
def add_act_triton(x: Tensor, residual: Tensor, activation: str) -> Tensor:
    """``act(x + residual)``; output like ``dense(x)``."""
    x = _layout.dense(x)
    residual = _layout.like(residual, x)
    y = torch.empty_like(x)
    if x.numel() > 0:
        _flat_launch(_add_act_fwd_kernel, (x, residual, y), x.numel(), activation, x.dtype == torch.float64)
    return y


@triton_custom_op("fastres::add_act_backward_triton")
def add_act_backward_triton(grad: Tensor, x: Tensor, residual: Tensor, activation: str) -> Tensor:
    """``grad * act'(x + residual)``, the gradient of both inputs of ``add_act``."""
    x = _layout.dense(x)
    residual = _layout.like(residual, x)
    grad = _layout.like(grad, x)
    grad_z = torch.empty_like(x)
    if x.numel() > 0:
        _flat_launch(
            _add_act_bwd_kernel, (grad, x, residual, grad_z), x.numel(), activation, x.dtype == torch.float64
        )
    return grad_z


@triton_custom_op("fastres::bn_act_triton")
def bn_act_triton(
    x: Tensor, scale: Tensor, shift: Tensor, residual: Optional[Tensor], activation: str
) -> Tensor:
    """``act(x * scale[c] + shift[c] (+ residual))`` for 4-D ``x``; output like ``dense(x)``."""
    x = _layout.dense(x)
    if residual is not None:
        residual = _layout.like(residual, x)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    channels_last, rows, k, c = _matrix(x)
    block_k = _block_k(k)
    block_r = max(1, min(_TILE // block_k, triton.next_power_of_2(rows)))
    num_k_blocks = triton.cdiv(k, block_k)
    grid = (triton.cdiv(rows, block_r) * num_k_blocks,)
    wrap(_bn_act_fwd_kernel)[grid](
        x, scale.contiguous(), shift.contiguous(), residual, y,  # residual: None (unread) without one
        rows, k, c, num_k_blocks,
        CHANNELS_LAST=channels_last, HAS_RES=residual is not None, ACT=ACT_CODES[activation],
        FP64=x.dtype == torch.float64, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=_num_warps(block_r * block_k),
    )
    return y


@triton_custom_op("fastres::bn_act_backward_triton")
def bn_act_backward_triton(
    grad: Tensor,
    x: Tensor,
    scale: Tensor,
    shift: Tensor,
    residual: Optional[Tensor],
    activation: str,
    residual_grad: bool,
    output: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(grad_x, grad_z, grad_scale, grad_shift, y)`` of ``bn_act``, in one pass over the data.

    ``grad_z`` (the residual's gradient) is empty unless ``residual_grad``;
    ``y``, the forward output ``bn_act(x, scale, shift, residual, activation)``
    recomputed in the same pass, is empty unless ``output``;
    ``grad_scale``/``grad_shift`` have the dtypes of ``scale``/``shift``.
    """
    x = _layout.dense(x)
    grad = _layout.like(grad, x)
    if residual is not None:
        residual = _layout.like(residual, x)
    grad_x = torch.empty_like(x)
    grad_z = torch.empty_like(x) if residual_grad else x.new_empty(0)
    y = torch.empty_like(x) if output else x.new_empty(0)
    if x.numel() == 0:
        return grad_x, grad_z, torch.zeros_like(scale), torch.zeros_like(shift), y
    fp64 = x.dtype == torch.float64
    channels_last, rows, k, c = _matrix(x)
    block_k = _block_k(k)
    if channels_last:  # channel block = BLOCK_K columns; tiles walk the rows
        block_r = max(1, min(_TILE_BWD // block_k, triton.next_power_of_2(rows)))
        num_c_blocks, num_k_tiles = triton.cdiv(c, block_k), 1
        num_tiles = triton.cdiv(rows, block_r)
    else:  # channel block = BLOCK_R rows of one image; tiles walk (image, pixel block)
        block_r = max(1, min(_TILE_BWD // block_k, triton.next_power_of_2(c)))
        num_c_blocks, num_k_tiles = triton.cdiv(c, block_r), triton.cdiv(k, block_k)
        num_tiles = x.shape[0] * num_k_tiles
    tiles_per_prog = max(1, triton.cdiv(num_tiles * num_c_blocks, _BWD_PROGRAMS))
    num_parts = triton.cdiv(num_tiles, tiles_per_prog)
    cdtype = torch.float64 if fp64 else torch.float32
    part_scale = torch.empty((num_parts, c), dtype=cdtype, device=x.device)
    part_shift = torch.empty((num_parts, c), dtype=cdtype, device=x.device)
    wrap(_bn_act_bwd_kernel)[(num_parts * num_c_blocks,)](
        grad, x, scale.contiguous(), shift.contiguous(), residual,  # None (unread) when absent:
        grad_x, grad_z if residual_grad else None, y if output else None,  # no argument aliases another
        part_scale, part_shift,
        rows, k, c, num_c_blocks, num_k_tiles, num_tiles, tiles_per_prog,
        CHANNELS_LAST=channels_last, HAS_RES=residual is not None, STORE_GZ=residual_grad, STORE_Y=output,
        ACT=ACT_CODES[activation], FP64=fp64, BLOCK_R=block_r, BLOCK_K=block_k,
        num_warps=_num_warps(block_r * block_k, per_thread=8),
    )
    return grad_x, grad_z, part_scale.sum(0).to(scale.dtype), part_shift.sum(0).to(shift.dtype), y
