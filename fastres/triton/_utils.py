"""Helpers shared by every Triton kernel family.

``INTERPRET`` is true under ``TRITON_INTERPRET=1``, where kernels run on CPU
tensors. Two consequences are handled here once:

* ``torch.library.triton_op`` traces into its body with fake tensors, which the
  interpreter cannot run, so under the interpreter the ops are registered as
  opaque ``custom_op`` s instead (``triton_custom_op``). On a GPU they are
  ``triton_op`` s, which ``torch.compile`` sees into.
* The interpreter multiplies raw bit patterns in ``tl.dot`` on bf16 operands
  (triton-lang/triton#11584); kernels upcast bf16 dot operands to fp32 when
  ``DOT_UPCAST_BF16`` is set, which only the interpreter needs.

Triton launches on the *current* CUDA device (and its current stream), not on
the tensors' device; every op registered through ``triton_custom_op`` therefore
runs under ``device_guard`` of its first argument (as the CUDA ops do with
``CUDAGuard``), so a call with tensors on ``cuda:1`` launches there whatever
the current device.
"""
from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from fastres import _triton_env

INTERPRET = _triton_env.interpret()  # fixed when the kernels are defined, as in triton
DOT_UPCAST_BF16 = INTERPRET

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def device_guard(t: torch.Tensor):
    """A context in which Triton launches go to ``t``'s device (a no-op off CUDA, and
    while torch.compile traces: the code it generates sets the device itself)."""
    if t.device.type != "cuda" or torch.compiler.is_compiling():
        return contextlib.nullcontext()
    return torch.cuda.device(t.device)


def triton_custom_op(name: str):
    """Register the decorated launcher as the custom op ``name`` (no mutated args),
    run under ``device_guard`` of its first argument (a tensor, on the device of all
    the others: the public API checks that)."""
    if _HAS_TRITON_OP and not INTERPRET:
        register = torch.library.triton_op(name, mutates_args=())
    else:
        register = torch.library.custom_op(name, mutates_args=())

    def decorate(fn):
        @functools.wraps(fn)  # the schema is inferred from fn's signature (inspect follows __wrapped__)
        def guarded(*args, **kwargs):
            with device_guard(args[0]):
                return fn(*args, **kwargs)

        return register(guarded)

    return decorate


def wrap(kernel):
    """``wrap_triton(kernel)`` where it exists and helps; the kernel itself otherwise."""
    if _HAS_TRITON_OP and not INTERPRET:
        return torch.library.wrap_triton(kernel)
    return kernel


# Activation codes passed to kernels as constexprs.
ACT_CODES = {"identity": 0, "relu": 1, "silu": 2}


@triton.jit
def apply_act(z, ACT: tl.constexpr):
    """``act(z)`` for ACT in ``ACT_CODES``; ``relu`` keeps NaN like ``torch.relu``."""
    if ACT == 1:
        z = tl.where(z > 0, z, tl.where(z != z, z, 0.0))
    elif ACT == 2:
        z = z / (1.0 + tl.exp(-z))
    return z


@triton.jit
def act_grad(z, g, ACT: tl.constexpr):
    """``g * act'(z)``, matching PyTorch's backward formulas."""
    if ACT == 1:
        # threshold_backward: zero where the output is <= 0; NaN passes the gradient.
        g = tl.where(z <= 0, 0.0, g)
    elif ACT == 2:
        s = 1.0 / (1.0 + tl.exp(-z))
        g = g * s * (1.0 + z * (1.0 - s))
    return g
