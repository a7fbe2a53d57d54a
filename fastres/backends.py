"""The backend registry: which backends exist, where each runs, and which implementation
runs a call.

Each backend is declared once, in its own module of ``fastres/_backends/`` (a
:class:`~fastres._backends.spec.Backend`: name, why it is unavailable on a
device, per op a list of implementations with their conditions, its preference
per device type, whether the tuner may time it). This module collects them;
``fastres.ops`` validates a call and dispatches it here, and the per-shape tuner
(``fastres._tune``) asks it for candidates. docs/architecture.md: how to add one.

* ``"torch"``: plain PyTorch (``fastres.reference``, with BatchNorm's CPU kernels and
  oneDNN's fused convolution where they apply), any device.
* ``"triton"``: the Triton kernels; CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.
* ``"cuda"``: the compiled CUDA C++ kernels of ``fastres._C``; CUDA tensors of a GPU
  whose architecture the kernels were compiled for.
* ``"cudnn"``: ``conv_bn_act`` only: cuDNN's fused convolution with the BN folded in.

``backend=None`` picks the first usable backend of the op in the device type's
preference order (on CPU that is always ``"torch"``); on CUDA, ``conv_bn_act``
chooses per shape instead (``fastres.tune``) among the tunable backends, which
include the internal ``"stock"`` (PyTorch's convolution, then ``bn_act``).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastres._backends import cuda_backend, cudnn_backend, stock_backend, torch_backend, triton_backend
from fastres._backends.spec import Backend, Impl, first_supporting


def _bn_act(x, scale, shift, residual, act):
    """``bn_act`` on the best backend for ``x``'s device (the stock backend's second pass)."""
    return run("fastres.ops.bn_act", "bn_act", None, (x, scale, shift, residual, act))


REGISTRY: Dict[str, Backend] = {
    b.name: b for b in (
        torch_backend.BACKEND, triton_backend.BACKEND, cuda_backend.BACKEND, cudnn_backend.BACKEND,
        stock_backend.make(_bn_act),
    )
}
BACKENDS = tuple(name for name, b in REGISTRY.items() if b.public)  # the names users may pass


def check_backend_name(op: str, backend) -> None:
    if backend is not None and not (backend in REGISTRY and REGISTRY[backend].public):
        raise ValueError(
            f"{op}: unknown backend {backend!r}; expected None (best available) or one of "
            + ", ".join(repr(b) for b in BACKENDS)
        )


def unavailable_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on ``device``, or None if it can."""
    return REGISTRY[backend].unavailable(device)


def implemented_backends(op: str) -> List[str]:
    """The public backends this build implements ``op`` with ("torch" always)."""
    return list(_IMPLEMENTED[op])


_IMPLEMENTED = {op: tuple(n for n in BACKENDS if op in REGISTRY[n].ops) for op in REGISTRY["torch"].ops}


def _rank(backend: str, device_type: str) -> Optional[int]:
    preference = REGISTRY[backend].preference
    return preference.get(device_type, preference.get("*"))


def _ranked(device_type: str, names: Sequence[str]) -> List[str]:
    ranks = ((_rank(n, device_type), n) for n in names)
    return [n for r, n in sorted(r for r in ranks if r[0] is not None)]


_RANKED = {(op, t): tuple(_ranked(t, names)) for op, names in _IMPLEMENTED.items() for t in ("cpu", "cuda")}


def usable_backends(device: torch.device, implemented: Optional[Sequence[str]] = None) -> List[str]:
    """The backends among ``implemented`` (default: all public ones) that ``backend=None``
    may pick on ``device``, best first."""
    names = _ranked(device.type, BACKENDS if implemented is None else implemented)
    return [n for n in names if unavailable_reason(n, device) is None]


def resolve(op: str, backend: Optional[str], device: torch.device, family: str) -> str:
    """The backend that runs op family ``family`` (``op``: the caller's name, for errors) on
    ``device``; raises if ``backend`` cannot."""
    if backend is None:
        ranked = _RANKED.get((family, device.type)) or _ranked(device.type, _IMPLEMENTED[family])
        return next(n for n in ranked if unavailable_reason(n, device) is None)
    check_backend_name(op, backend)
    reason = unavailable_reason(backend, device)
    if reason is not None:
        raise RuntimeError(f"{op}: backend {backend!r} is unavailable: {reason}")
    if backend not in _IMPLEMENTED[family]:
        raise RuntimeError(
            f"{op}: backend {backend!r} is not implemented for this op; implemented: "
            + ", ".join(repr(b) for b in _IMPLEMENTED[family])
        )
    return backend


def select(op: str, family: str, backend: str, args: Sequence) -> Impl:
    """The implementation of ``backend`` (or of its fallback) that runs ``args``; raises
    ``NotImplementedError`` with the reason when none takes them."""
    b = REGISTRY[backend]
    impl, reason = first_supporting(b.ops[family], args)
    if impl is not None:
        return impl
    if b.fallback is not None:
        return select(op, family, b.fallback, args)
    raise NotImplementedError(f"{op}: backend {backend!r} cannot run this call: {reason}")


def run(op: str, family: str, backend: Optional[str], args: Sequence):
    """Resolve the backend on the device of ``args[0]`` and run its implementation."""
    name = resolve(op, backend, args[0].device, family)
    return select(op, family, name, args).fn(*args)


# ----------------------------------------------------------------------------
# What the per-shape tuner of conv_bn_act chooses among
# ----------------------------------------------------------------------------


def tune_names() -> Tuple[str, ...]:
    """Every backend the tuner may choose, in display order (GPU preference, then the rest)."""
    tunable = [(b.preference.get("cuda", len(REGISTRY)), name) for name, b in REGISTRY.items() if b.tune]
    return tuple(name for _, name in sorted(tunable))


def tune_available(device: torch.device) -> Tuple[str, ...]:
    """The backends the tuner may time for ``conv_bn_act`` on ``device`` (any shape), in measuring order."""
    names = sorted((n for n, b in REGISTRY.items() if b.tune and "conv_bn_act" in b.ops), key=lambda n: REGISTRY[n].tune[1])
    return tuple(n for n in names if REGISTRY[n].unavailable(device) is None)


def tune_takes(backend: str, args: Sequence) -> bool:
    """Whether one of ``backend``'s own ``conv_bn_act`` implementations takes ``args`` (a call
    that a backend sends to its fallback is the fallback's candidate, not its own)."""
    return first_supporting(REGISTRY[backend].ops["conv_bn_act"], args)[0] is not None


def tune_static_choice(usable: Sequence[str]) -> str:
    """Without a measurement: the first of ``usable`` by the backends' static rank."""
    return min(usable, key=lambda n: REGISTRY[n].tune[0])


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def summary() -> Dict[str, Optional[str]]:
    """Each public backend's availability on the default device: None if usable, else why not."""
    dev = default_device()
    return {b: unavailable_reason(b, dev) for b in BACKENDS}
