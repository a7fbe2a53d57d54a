"""Per-shape backend choice of ``fastres.ops.conv_bn_act(backend=None)`` on CUDA.

``cache_path()``, ``clear()``, ``choices()``, ``used()``, ``autotune_enabled()``, and
``python -m fastres.tune --show | --clear | --path``. How choices are made and
remembered: ``fastres/_tune.py`` (this module re-exports it; the package does
not import it, so ``python -m fastres.tune`` runs it once).
"""
import sys

from fastres._tune import autotune_enabled, cache_path, choices, clear, format_table, main, used, versions

__all__ = ["autotune_enabled", "cache_path", "choices", "clear", "format_table", "main", "used", "versions"]

if __name__ == "__main__":
    sys.exit(main())
