"""How far the cudnn backend's BN folding moves 16-bit results, on a CPU.

    python scripts/fold_accuracy.py [--archs resnet18 resnet50] [--dtype bfloat16] [--image-size 64]

For each model (seeded random weights, BN statistics from three train-mode
batches), the logits' error against torchvision fp32, relative to max|logits|:

* torchvision run in ``dtype`` (the accuracy rule's yardstick: fastres may be at most 1.5x this);
* fastres ``backend="cudnn"`` in ``dtype``: the BN folded into the weight, one
  fused conv + bias + relu (+ add) per conv. On a CPU the fused op runs its CPU
  body, the same math as cuDNN's fused graph (fp32 epilogue, one rounding);
  the cudnn backend's name needs CUDA tensors, so this script lifts that check;
* fastres ``backend="torch"`` in ``dtype``: the reference, unfolded (conv in
  ``dtype``, fp32 BN epilogue), i.e. what folding changes.

CPU convolutions accumulate differently from cuDNN's, so this measures the
folding, not a GPU's numbers.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torchvision  # noqa: E402

import fastres  # noqa: E402
from fastres import backends  # noqa: E402


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    cudnn = backends.REGISTRY["cudnn"]  # run the fused op's CPU body (see the docstring)
    backends.REGISTRY["cudnn"] = dataclasses.replace(cudnn, unavailable=lambda device: None)
    print(f"logits error vs torchvision fp32 (max |y - ref| / max |ref|), {args.dtype}, batch {args.batch}, "
          f"{args.image_size}x{args.image_size}, CPU")
    for arch in args.archs:
        torch.manual_seed(0)
        tv = getattr(torchvision.models, arch)().train()
        with torch.no_grad():
            for _ in range(3):  # BN running statistics of real activations
                tv(torch.randn(8, 3, args.image_size, args.image_size))
        tv.eval()
        x = torch.randn(args.batch, 3, args.image_size, args.image_size)
        with torch.no_grad():
            ref = tv(x).double()
            fr = fastres.convert(tv, warn=False).to(dtype).eval()
            tv16 = tv.to(dtype)(x.to(dtype)).double()
            out = {}
            for backend in ("cudnn", "torch"):
                fastres.set_backend(fr, backend)
                out[backend] = fr(x.to(dtype)).double()

        def err(y):
            return ((y - ref).abs().max() / ref.abs().max()).item()

        print(f"{arch:>10}: torchvision {err(tv16):.4f}  fastres cudnn (folded) {err(out['cudnn']):.4f} "
              f"({err(out['cudnn']) / err(tv16):.2f}x)  fastres torch (unfolded) {err(out['torch']):.4f} "
              f"({err(out['torch']) / err(tv16):.2f}x)")


if __name__ == "__main__":
    main()
