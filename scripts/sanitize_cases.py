"""Runs every CUDA C++ kernel once on small inputs, for compute-sanitizer.

Covers each kernel path: vectorized and scalar (odd channel counts, odd H*W,
misaligned storage offsets), NCHW and NHWC, with and without residual,
forward and backward, each dtype. Exits non-zero if a result is wrong, so a
sanitizer run also checks values.

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py

``cuda-conv`` runs the CUTLASS convolution ``conv_bn_act_cuda`` instead: one
small case per kernel configuration (each 16-bit tile forced through
FASTRES_CUDA_CONV_TILE, the Hopper tiles first on an sm_90 GPU, the
fixed-channel stem kernel, the TF32 kernel), with
partial tiles, channel padding, both memory formats, residual or not:

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py cuda-conv
"""
import math
import os
import sys

import torch

from fastres import _extension, ops, reference

SHAPES = [(2, 8, 4, 4), (1, 3, 7, 9), (2, 16, 1, 1), (3, 5, 3, 5)]


def _inputs(shape, dtype, fmt, offset):
    """A tensor of ``shape`` in ``fmt`` starting ``offset`` elements into its storage
    (offset 1 breaks 16-byte alignment: the scalar path)."""
    base = torch.randn(math.prod(shape) + offset, device="cuda").to(dtype)
    strides = torch.empty(shape, device="meta").contiguous(memory_format=fmt).stride()
    return base[offset:].as_strided(shape, strides)


def main(backend: str = "cuda") -> int:
    failures = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for fmt in (torch.contiguous_format, torch.channels_last):
            for shape in SHAPES:
                for offset in (0, 1):
                    x = _inputs(shape, dtype, fmt, offset).requires_grad_()
                    r = _inputs(shape, dtype, fmt, offset).requires_grad_()
                    scale = (torch.rand(shape[1], device="cuda") + 0.5).requires_grad_()
                    shift = torch.randn(shape[1], device="cuda").requires_grad_()
                    g = torch.randn(shape, device="cuda").to(dtype)
                    for act in ("relu", "silu", "identity"):
                        for name, args in (("add_act", (x, r)), ("bn_act", (x, scale, shift, r)),
                                           ("bn_act", (x, scale, shift, None))):
                            out = getattr(ops, name)(*args, act, backend=backend)
                            grads = torch.autograd.grad(out, [a for a in args if a is not None], g)
                            want = getattr(reference, name)(*args, act)
                            want_grads = torch.autograd.grad(want, [a for a in args if a is not None], g)
                            tol = dict(rtol=2e-2, atol=2e-2)
                            ok = torch.allclose(out.float(), want.float(), **tol) and all(
                                torch.allclose(a.float(), b.float(), **tol) for a, b in zip(grads, want_grads))
                            if not ok:
                                failures += 1
                                print(f"MISMATCH {name} residual={args[-1] is not None} {dtype} {fmt} {shape} offset={offset} {act}")
    torch.cuda.synchronize()
    print(f"sanitize cases done: {failures} mismatches")
    return 1 if failures else 0


# (tile forced or None, dtype, (N, C, H, W), (K, R, S), stride, padding, dilation, groups, format, residual, act)
CONV_CASES = [
    # The Hopper kernels first (skipped with a note off sm_90 or when not built).
    ("sm90-128x128", torch.bfloat16, (2, 64, 9, 7), (136, 3, 3), 1, 1, 1, 1, torch.channels_last, True, "relu"),
    ("sm90-128x64", torch.float16, (1, 24, 11, 13), (72, 1, 1), 2, 0, 1, 1, torch.contiguous_format, True, "silu"),
    ("sm90-128x64", torch.bfloat16, (2, 16, 7, 9), (40, 3, 3), 1, 2, 2, 1, torch.channels_last, False, "identity"),
    ("128x128", torch.float16, (2, 32, 9, 9), (136, 3, 3), 1, 1, 1, 1, torch.channels_last, True, "relu"),
    ("128x64", torch.bfloat16, (2, 64, 9, 7), (64, 1, 1), 2, 0, 1, 1, torch.contiguous_format, False, "silu"),
    ("64x64", torch.float16, (1, 40, 7, 7), (72, 3, 3), 1, 2, 2, 1, torch.channels_last, True, "identity"),
    ("128x32", torch.bfloat16, (2, 64, 6, 6), (64, 3, 3), 1, 1, 1, 2, torch.channels_last, True, "relu"),
    (None, torch.float16, (2, 3, 19, 17), (10, 7, 7), 2, 3, 1, 1, torch.contiguous_format, True, "relu"),  # stem
    (None, torch.float32, (2, 20, 9, 9), (24, 3, 3), 1, 1, 1, 1, torch.channels_last, True, "silu"),  # TF32
]


def conv_main() -> int:
    """Each conv_bn_act_cuda kernel configuration once, checked against the reference."""
    failures = 0
    sm90 = torch.cuda.get_device_capability()[0] == 9 and any(
        k.startswith("sm90") for k in _extension.cuda_conv_kernels())
    for tile, dtype, xs, (k, r, s), stride, padding, dilation, groups, fmt, with_res, act in CONV_CASES:
        if tile is not None and tile.startswith("sm90") and not sm90:
            print(f"skipped {tile}: not an sm_90 GPU or the Hopper kernels are not built")
            continue
        os.environ.pop("FASTRES_CUDA_CONV_TILE", None)
        if tile is not None:
            os.environ["FASTRES_CUDA_CONV_TILE"] = tile
        torch.backends.cudnn.allow_tf32 = dtype == torch.float32  # the kernel may use TF32 ...
        x = torch.randn(xs, device="cuda").to(dtype).contiguous(memory_format=fmt)
        w = (torch.randn(k, xs[1] // groups, r, s, device="cuda") / math.sqrt(xs[1] // groups * r * s)).to(dtype)
        scale, shift = torch.rand(k, device="cuda") + 0.5, torch.randn(k, device="cuda")
        conv = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
        p, q = ((size + 2 * padding - dilation * (kk - 1) - 1) // stride + 1 for size, kk in ((xs[2], r), (xs[3], s)))
        out_shape = (xs[0], k, p, q)
        res = torch.randn(out_shape, device="cuda").to(dtype).contiguous(memory_format=fmt) if with_res else None
        out = ops.conv_bn_act(x, w, scale, shift, res, activation=act, backend="cuda", **conv)
        torch.backends.cudnn.allow_tf32 = False  # ... the reference may not
        up = (lambda t: None if t is None else t.float())  # noqa: E731
        want = reference.conv_bn_act(up(x), up(w), scale, shift, up(res), (stride,) * 2, (padding,) * 2,
                                     (dilation,) * 2, groups, act).to(dtype)
        if not torch.allclose(out.float(), want.float(), rtol=2e-2, atol=2e-2):
            failures += 1
            print(f"MISMATCH conv tile={tile} {dtype} x={xs} k={k} {r}x{s} groups={groups} {fmt} "
                  f"residual={with_res} {act}: max error {(out.float() - want.float()).abs().max().item():.3g}")
    os.environ.pop("FASTRES_CUDA_CONV_TILE", None)
    torch.cuda.synchronize()
    print(f"sanitize conv cases done: {failures} mismatches")
    return 1 if failures else 0


if __name__ == "__main__":
    if sys.argv[1:] == ["cuda-conv"]:
        sys.exit(conv_main())
    sys.exit(main(*sys.argv[1:]))
