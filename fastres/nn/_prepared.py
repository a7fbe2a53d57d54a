"""Prepared forms: what a module derives from its parameters for its fused convs, made once."""
from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from fastres import ops, reference
from fastres._tracing import is_tracing
from fastres.nn._casting import cast


def eval_scale_shift(bn: _BatchNorm, conv_bias: Optional[Tensor], ct: torch.dtype) -> Tuple[Tensor, Tensor]:
    """``bn(conv(x) + conv_bias)`` with running statistics as ``conv(x) * scale + shift``."""
    scale, shift = ops.bn_scale_shift(bn)
    scale, shift = scale.to(ct), shift.to(ct)
    if conv_bias is not None:
        shift = shift + scale * conv_bias.to(ct)
    return scale, shift


def _version(t: Tensor) -> Optional[int]:
    """``t``'s autograd version counter; None for an inference tensor, which has none."""
    return None if t.is_inference() else t._version


def _plain(t: Tensor) -> bool:
    """A real tensor whose data_ptr and version counter mean something (not fake, functional, batched)."""
    return type(t) in (torch.Tensor, nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


class PreparedCache:
    """What a module derives from its parameters for each fused conv, computed once, never stale.

    An entry is keyed by ``(slot, kind)``: ``slot`` names the conv/BN pair in the
    module (``"bn1"``, ``"downsample"``...), ``kind`` the derived form:
    ``"scale_shift"`` (the eval-mode fp32 ``(scale, shift)``), ``"weight"`` (the
    conv weight in the autocast dtype) and, per backend implementation that
    prepares a form, its name (``"onednn"``: the BN-folded, prepacked oneDNN
    weight; ``"cudnn"``: the BN-folded weight and bias; ``"triton"``, ``"cuda"``:
    the weight in the KRSC layout the kernels read). Each ``(slot, kind)`` holds
    one value.

    A value is reused only while every source tensor it was made from is the same
    object with the same data_ptr, dtype, device and version counter, and its
    extra key and inference mode are unchanged; owning modules drop their entries
    on ``train()``/``eval()``, ``_apply`` and ``load_state_dict``. Nothing is cached
    under tracing or CUDA-graph capture, when autograd must reach a source, or for
    non-plain tensors. docs/models.md ("Prepared weights") has the rules in full,
    and the edits of inference tensors that only ``fastres.nn.clear_cache`` catches.
    """

    def __init__(self) -> None:
        self._entries: Dict[Tuple[str, str], tuple] = {}
        self.plans: Dict[str, Any] = {}  # slot -> its CallPlan (fastres/nn/_eval.py)

    def clear(self) -> None:
        self._entries.clear()
        self.plans.clear()

    def __len__(self) -> int:
        return len(self._entries)

    def nbytes(self, kind: Optional[str] = None) -> int:
        """Bytes held by the cached values (of ``kind``; all when None): the prepared copies' resident memory."""
        return sum(_nbytes(entry[3]) for (_, k), entry in self._entries.items() if kind in (None, k))

    @staticmethod
    def stamp(sources: Tuple[Optional[Tensor], ...], x: Tensor) -> Optional[tuple]:
        """What a cached value made from ``sources`` is valid for (their data_ptr, version, dtype,
        device, and inference mode); None when nothing may be cached (see the class docstring).
        ``x``: the call's input (CUDA-graph capture is checked on its device)."""
        if not _cacheable(sources, x):
            return None
        return tuple(
            None if t is None else (t.data_ptr(), _version(t), t.dtype, t.device) for t in sources
        ) + (torch.is_inference_mode_enabled(),)

    def get(self, slot: str, kind: str, sources: Tuple[Optional[Tensor], ...], extra: tuple,
            make: Callable[[], Any], x: Tensor, stamp: Any = False):
        """``make()``, or its cached value for ``(slot, kind)`` while ``sources`` and ``extra`` are unchanged.

        ``sources``: every parameter or buffer ``make`` reads (None for absent
        ones); ``extra``: everything else its result depends on (hashable);
        ``stamp``: :meth:`stamp` of ``sources`` if the caller has it.
        """
        if stamp is False:
            stamp = self.stamp(sources, x)
        if stamp is None:
            return make()
        key = stamp + extra
        entry = self._entries.get((slot, kind))
        if entry is not None and entry[0] == key and all(a is b for a, b in zip(entry[1], sources)):
            return entry[3]
        value = make()
        pins = tuple(None if t is None else t.detach() for t in sources)  # keeps the storages alive
        self._entries[(slot, kind)] = (key, sources, pins, value)
        return value

    def scale_shift(self, slot: str, bn: _BatchNorm, conv_bias: Optional[Tensor], x: Tensor,
                    sources: Optional[tuple] = None, stamp: Any = False) -> Tuple[Tensor, Tensor]:
        """Eval-mode ``(scale, shift)`` in ``x``'s compute dtype (fp32, fp64 for fp64); ``sources`` (with
        its ``stamp``) may name more tensors than the BN's and the conv bias, to share one stamp."""
        ct = reference.compute_dtype(x.dtype)
        sources = sources or (bn.weight, bn.bias, bn.running_mean, bn.running_var, conv_bias)
        return self.get(slot, "scale_shift", sources, (float(bn.eps), ct), lambda: eval_scale_shift(bn, conv_bias, ct),
                        x, stamp)

    def kernel_weight(self, slot: str, weight: Tensor, dtype: torch.dtype, x: Tensor) -> Tensor:
        """The conv weight in ``dtype`` (autocast's low-precision copy), made once."""
        if weight.dtype == dtype:
            return weight
        if not _cacheable((weight,), x):
            return cast(weight, dtype)
        return self.get(slot, "weight", (weight,), (dtype,), lambda: weight.to(dtype), x)

    def forms(self, slot: str, sources: Tuple[Optional[Tensor], ...], extra: tuple, source_weight: Tensor,
              x: Tensor, stamp: Any = False):
        """The prepared forms of backend implementations for this conv (``fastres.ops.run_conv_bn_act``'s
        ``prepared``): ``(impl, args) -> impl.prepare(source_weight, *args)``, cached under the impl's
        name while ``sources``, ``extra`` and ``impl.form_key(*args)`` are unchanged."""

        def prepared(impl, args):
            form = self.get(slot, impl.name, sources, extra + impl.form_key(*args),
                            lambda: impl.prepare(source_weight, *args), x, stamp)
            prepared.used = (impl, form)
            return form

        prepared.used = None  # (impl, form) of the call, once made
        return prepared


def _nbytes(value) -> int:
    if value is None:
        return 0
    if isinstance(value, Tensor):
        return value.numel() * value.element_size()
    if callable(getattr(value, "nbytes", None)):
        return value.nbytes()
    return sum(_nbytes(v) for v in value)


def _cacheable(sources, x: Tensor) -> bool:
    if is_tracing():
        return False
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        return False
    grad = torch.is_grad_enabled()
    for t in sources:
        if t is None:
            continue
        if not _plain(t) or (grad and t.requires_grad):
            return False
    return True
