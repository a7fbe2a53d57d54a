"""What a backend declares: :class:`Backend` and its per-op :class:`Impl` list."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from fastres import _layout


@dataclass(frozen=True)
class Impl:
    """One way a backend computes an op.

    ``fn(*args)`` computes it; ``supports(*args)`` says why it does not take
    these arguments (None: it does), and a backend runs the first of its impls
    that takes them. An impl that derives a form from the weights (a folded,
    prepacked weight) splits ``fn`` into ``prepare(source_weight, *args)`` and
    ``run(form, *args)``, and ``form_key(*args)`` names what the form depends on
    besides the weights: a module caches the form (``fastres.nn.prepared``).
    ``source_weight`` is the module's own weight (fp32 under autocast), for
    impls that fold it in fp32 before their one rounding.
    """

    name: str
    fn: Callable
    supports: Optional[Callable[..., Optional[str]]] = None
    prepare: Optional[Callable] = None
    run: Optional[Callable] = None
    form_key: Optional[Callable] = None

    def reason(self, args: Sequence) -> Optional[str]:
        return None if self.supports is None else self.supports(*args)


@dataclass(frozen=True)
class Backend:
    """A backend: its name, why it cannot run on a device, and its impls per op.

    ``preference``: device type (``"*"``: any other) -> rank of this backend among those
    ``backend=None`` may pick there (lower first; absent: never picked by default there).
    ``tune``: ``(static rank, measure rank)`` when the per-shape tuner of
    ``conv_bn_act`` may choose it: the order without a measurement, and the order
    of timing (cheap first calls first). ``fallback``: the backend that runs a call
    none of this backend's impls takes (else the call raises with the reason).
    ``public``: a name users may pass as ``backend=``.
    """

    name: str
    unavailable: Callable[[torch.device], Optional[str]]
    ops: Mapping[str, List[Impl]]
    preference: Dict[str, int] = field(default_factory=dict)
    tune: Optional[tuple] = None
    fallback: Optional[str] = None
    public: bool = True


def first_supporting(impls: Sequence[Impl], args: Sequence):
    """``(impl, None)``: the first of ``impls`` that takes ``args``; ``(None, reason)`` if none does."""
    reason = None
    for impl in impls:
        reason = impl.reason(args)
        if reason is None:
            return impl, None
    return None, reason


def kernel_impl(name: str, op: Callable, supports: Optional[Callable[..., Optional[str]]] = None,
                family: str = "") -> Impl:
    """The impl of a kernel backend's custom ``op``. For ``conv_bn_act`` its prepared form is the
    weight in the KRSC (channels_last) layout the kernels read, for a channels_last ``x``: the
    kernels then copy no weight per call (None: the weight already is)."""
    if family != "conv_bn_act":
        return Impl(name, op, supports)

    def prepare(source_weight, x, weight, *rest):
        if _layout.is_channels_last(x) and not weight.is_contiguous(memory_format=torch.channels_last):
            return weight.contiguous(memory_format=torch.channels_last)
        return None

    def run(form, x, weight, *rest):
        return op(x, weight if form is None else form, *rest)

    def form_key(x, weight, *rest):
        return (weight.dtype, _layout.is_channels_last(x))

    return Impl(name, op, supports, prepare=prepare, run=run, form_key=form_key)
