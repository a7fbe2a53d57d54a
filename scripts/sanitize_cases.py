"""Runs every CUDA C++ kernel once on small inputs, for compute-sanitizer.

Covers each kernel path: vectorized and scalar (odd channel counts, odd H*W,
misaligned storage offsets), NCHW and NHWC, with and without residual,
forward and backward, each dtype. Exits non-zero if a result is wrong, so a
sanitizer run also checks values.

    compute-sanitizer --tool memcheck python scripts/sanitize_cases.py
"""
import math
import sys

import torch

from fastres import ops, reference

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


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
