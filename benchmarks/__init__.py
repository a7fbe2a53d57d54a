"""fastres benchmarks: ``python -m benchmarks --help``."""
