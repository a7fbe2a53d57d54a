"""``fastres.info()``: what this installation can do, and why not where it can't.

``python -m fastres.info`` (``fastres/info.py``) prints it as a table
(``--json`` for JSON).
"""
from __future__ import annotations

import argparse
import json
from typing import Any, Dict

import torch

from fastres import _extension, _triton_env, _version, backends


def info() -> Dict[str, Any]:
    """Versions, build and the backends usable now on the default device."""
    device = backends.default_device()
    availability = backends.summary()
    return {
        "version": _version.__version__,
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _triton_env.VERSION,
        "triton_interpret": _triton_env.interpret(),
        "cuda_ext": _extension.LOADED,
        "cuda_ext_error": _extension.LOAD_ERROR,
        "cpu_kernels": _extension.has_cpu_kernels(),
        "cuda_kernels": _extension.has_cuda_kernels(),
        "cuda_arch_list": _extension.cuda_arch_list(),
        "cuda_conv_kernels": _extension.cuda_conv_kernels(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "backends": [b for b, why in availability.items() if why is None],
        "unavailable": {b: why for b, why in availability.items() if why is not None},
    }


def _table(d: Dict[str, Any]) -> str:
    width = max(len(k) for k in d)
    lines = []
    for key, value in d.items():
        if isinstance(value, dict):
            if not value:
                continue
            lines.append(f"{key:<{width}}")
            lines += [f"  {k:<{width - 2}}  {v}" for k, v in value.items()]
        else:
            if isinstance(value, list):
                value = ", ".join(value) or "-"
            lines.append(f"{key:<{width}}  {'-' if value is None else value}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fastres.info", description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    d = info()
    print(json.dumps(d, indent=2) if args.json else _table(d))
