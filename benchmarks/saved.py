"""Bytes saved for backward: what a training step keeps alive between its forward and backward.

Counted with ``torch.autograd.graph.saved_tensors_hooks`` as the bytes of the
distinct storages that autograd saves during ``fn(*args)`` (a tensor saved by
several ops, or views of one storage, count once), so the count is the same on
every device and needs no timing. Storages of ``exclude`` (e.g. the model's
parameters, which every implementation keeps alike) can be left out.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, Tuple

import torch


def saved_bytes(fn: Callable, *args, exclude: Iterable[torch.Tensor] = ()) -> Tuple[int, object]:
    """``(bytes of distinct storages saved for backward during fn(*args), fn's result)``."""
    skip = {(t.device, t.untyped_storage().data_ptr()) for t in exclude}
    seen: Dict[Tuple[torch.device, int], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (t.device, storage.data_ptr())
        if key not in skip:
            seen[key] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return sum(seen.values()), out


def main(argv=None) -> None:
    """``python -m benchmarks.saved [--arch ...] [--dtype ...] [--batch N] [--image-size S] [--compile]``:
    the bytes a training forward saves for backward, torchvision against fastres (``"low"`` and
    ``"min"``), on the CPU, NCHW and channels_last, fp32 and bf16 (autocast, as bf16 training
    runs), parameters left out (no timing: seconds per model; ``--compile`` adds torchvision
    under ``torch.compile``, whose partitioner recomputes too, counted on its second call)."""
    import argparse
    import contextlib
    import copy

    import torchvision

    import fastres

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--arch", nargs="+", default=["resnet18", "resnet50"])
    parser.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--compile", action="store_true", help="add torchvision under torch.compile")
    args = parser.parse_args(argv)
    columns = ["torchvision", *(["tv-compile"] if args.compile else []), "fastres low", "fastres min"]
    print("| model | dtype | layout | torchvision MiB | "
          + " | ".join(f"{c} MiB | vs tv" for c in columns[1:]) + " |")
    print("|---|---|---|---:|" + "---:|---:|" * (len(columns) - 1))
    for arch in args.arch:
        for dtype in args.dtype:
            for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
                torch.manual_seed(0)
                tv = torchvision.models.get_model(arch).train().to(memory_format=fmt)
                x = torch.randn(args.batch, 3, args.image_size, args.image_size).contiguous(memory_format=fmt)

                def count(model, calls=1):
                    amp = torch.autocast("cpu", torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
                    with amp:
                        for _ in range(calls - 1):  # torch.compile: the first call compiles
                            model(x)
                        return saved_bytes(model, x, exclude=model.parameters())[0]

                base = count(tv)
                others = [(torch.compile(copy.deepcopy(tv)), 2)] if args.compile else []
                others += [(fastres.set_training_memory(fastres.convert(copy.deepcopy(tv), warn=False), mode), 1)
                           for mode in ("low", "min")]
                row = [arch, dtype, layout, f"{base / 2**20:.0f}"]
                for model, calls in others:
                    n = count(model, calls)
                    row += [f"{n / 2**20:.0f}", f"{n / base:.3f}x"]
                print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
