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
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DOT_UPCAST_BF16 = INTERPRET

_HAS_TRITON_OP = hasattr(torch.library, "triton_op") and hasattr(torch.library, "wrap_triton")


def triton_custom_op(name: str):
    """Register the decorated launcher as the custom op ``name`` (no mutated args)."""
    if _HAS_TRITON_OP and not INTERPRET:
        return torch.library.triton_op(name, mutates_args=())
    return torch.library.custom_op(name, mutates_args=())


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
