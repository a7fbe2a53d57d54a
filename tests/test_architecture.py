"""The import graph of the package: layers import downwards only, and there is no cycle.

``convert -> models -> nn -> ops -> (tuner) -> registry (fastres.backends) -> backend modules
(fastres._backends) -> kernels / reference``; docs/architecture.md draws it.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1] / "fastres"
UPPER = ("fastres.nn", "fastres.models", "fastres.convert")
# Modules below the registry: the backends' implementations and what they build on.
KERNELS = ("fastres._backends", "fastres._cudnn", "fastres._onednn", "fastres._cpu_bn", "fastres.triton",
           "fastres.reference", "fastres._opdefs", "fastres._conv", "fastres._checks", "fastres._layout",
           "fastres._extension", "fastres._triton_env", "fastres._tracing")


def _module_name(path: pathlib.Path) -> str:
    parts = ("fastres",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _imports(name: str) -> set:
    """The fastres modules ``name`` imports anywhere in its source (functions included)."""
    out = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("fastres"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastres"):
            for a in node.names:  # `from fastres import ops` imports the module fastres.ops
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in MODULES else node.module)
    return {m for m in out if m != name}


GRAPH = {name: _imports(name) for name in MODULES}


def test_no_import_cycle():
    done, stack = set(), []

    def visit(m):
        if m in stack:
            pytest.fail("import cycle: " + " -> ".join(stack[stack.index(m):] + [m]))
        if m in done:
            return
        stack.append(m)
        for dep in GRAPH.get(m, ()):
            visit(dep)
        stack.pop()
        done.add(m)

    for m in sorted(GRAPH):
        visit(m)


def test_no_module_imports_the_package_itself():
    """``import fastres`` from inside would pull nn, models and convert into every low-level import."""
    assert [m for m, deps in GRAPH.items() if "fastres" in deps] == []


@pytest.mark.parametrize("low", KERNELS)
def test_implementations_never_import_upwards(low):
    upward = ("fastres.ops", "fastres.backends", "fastres._tune", *UPPER)
    for m, deps in GRAPH.items():
        if m == low or m.startswith(low + "."):
            assert not [d for d in deps if d.startswith(upward)], (m, deps)


@pytest.mark.parametrize("module", ["fastres.ops", "fastres.reference", "fastres.triton", "fastres.backends"])
def test_low_level_import_leaves_the_upper_layers_alone(module):
    code = (f"import sys, {module}; "
            f"print(sorted(m for m in sys.modules if m.startswith({UPPER!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
