"""Triton as installed here: its version, whether the interpreter is on, and why kernels
cannot run. The one place that reads ``TRITON_INTERPRET`` and triton's version."""
from __future__ import annotations

import os
import re
from typing import Optional, Tuple


def _status() -> Tuple[Optional[str], Optional[str]]:
    try:
        import triton
    except ImportError as e:
        return None, f"triton is not installed ({e})"
    return triton.__version__, None


VERSION, IMPORT_ERROR = _status()  # the version string (None without triton), why it is missing


def version_tuple(version: Optional[str] = None) -> Tuple[int, int]:
    """``(major, minor)`` of ``version`` (default: the installed triton's)."""
    major, minor = (int(p) for p in re.findall(r"\d+", version or VERSION)[:2])
    return major, minor


def interpret() -> bool:
    """Whether ``TRITON_INTERPRET=1``: Triton kernels run on CPU tensors in its interpreter.
    Triton reads it when kernels are defined, so set it before importing triton."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreter_reason(version: Optional[str] = None) -> Optional[str]:
    """Why the Triton interpreter cannot run the kernels here, or None.

    Triton 3.6's interpreter converts one-element arrays to Python scalars, which
    numpy 2.4 refuses (TypeError); 3.8's runs with it (the two tested tritons).
    """
    import numpy

    version = version or VERSION
    if version_tuple(version) < (3, 8) and version_tuple(numpy.__version__) >= (2, 4):
        return (
            f"the interpreter of triton {version} needs numpy < 2.4 (numpy {numpy.__version__} "
            "is installed); install numpy<2.4 or triton>=3.8"
        )
    return None
