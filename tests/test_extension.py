"""The compiled extension fastres._C, checked without a GPU.

It loads; it declares every op's schema (csrc/bindings.cpp); every build has
the CPU kernels (csrc/cpu/); a CUDA build registers a CUDA kernel for each CUDA
op and reports its architectures; the CUDA ops
reject CPU tensors through the dispatcher; and the C++ schemas equal those of
the Triton twins, so both backends share one fake kernel and one autograd
formula (fastres/ops.py). The kernels' numerics are tested on a GPU by
tests/test_elementwise.py.
"""
import re

import pytest
import torch

import fastres
from fastres import _extension

CUDA_OPS = ["add_act_cuda", "add_act_backward_cuda", "bn_act_cuda", "bn_act_backward_cuda"]

BUILT_WITHOUT_CUDA = (
    "fastres._C was built C++-only (FASTRES_BUILD_CUDA=0, no nvcc, or a CPU-only torch at build "
    "time): it has the schemas but no CUDA kernels"
)
needs_extension = pytest.mark.skipif(
    not _extension.LOADED, reason=f"fastres._C did not load: {_extension.LOAD_ERROR}"
)
needs_cuda_kernels = pytest.mark.skipif(
    not (_extension.LOADED and _extension.has_cuda_kernels()), reason=BUILT_WITHOUT_CUDA
)


def _defined(qualname: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(qualname, "")
    except RuntimeError:
        return False
    return True


def test_extension_loads():
    assert _extension.LOADED, (
        f"fastres._C did not load ({_extension.LOAD_ERROR}); build it with "
        "`pip install -e . --no-build-isolation`"
    )
    import fastres._C  # noqa: F401

    info = fastres.info()
    assert info["cuda_ext"] is True
    assert info["cuda_ext_error"] is None


@needs_extension
@pytest.mark.parametrize("op", [*CUDA_OPS, "_cuda_arch_list"])
def test_schema_defined(op):
    assert _defined(f"fastres::{op}"), f"csrc/bindings.cpp does not declare fastres::{op}"


@needs_extension
def test_cpu_kernels_in_every_build():
    """csrc/cpu/ is compiled into the C++-only extension and the CUDA one alike."""
    assert fastres.info()["cpu_kernels"] is True
    for op in ("_bn_act_cpu", "_bn_act_train_backward_cpu"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastres::{op}", "CPU"), op


@needs_cuda_kernels
def test_info_reports_cuda_kernels():
    info = fastres.info()
    assert info["cuda_kernels"] is True
    assert info["cuda_arch_list"] == torch.ops.fastres._cuda_arch_list().split()


@needs_cuda_kernels
@pytest.mark.parametrize("op", CUDA_OPS)
def test_dispatcher_has_cuda_kernel(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fastres::{op}", "CUDA")
    # The CUDA ops have no CPU kernel: CPU tensors go to the torch/triton backends.
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"fastres::{op}", "CPU")


@needs_cuda_kernels
def test_cuda_arch_list():
    archs = torch.ops.fastres._cuda_arch_list()
    assert isinstance(archs, str) and archs, "a CUDA build must report its TORCH_CUDA_ARCH_LIST"
    for arch in archs.split():
        assert re.fullmatch(r"\d+\.\d+a?(\+PTX)?|[A-Za-z][A-Za-z+]*", arch), f"unexpected arch {arch!r} in {archs!r}"


@needs_extension
@pytest.mark.skipif(_extension.has_cuda_kernels(), reason="built with CUDA kernels")
def test_cpp_only_build_reports_no_cuda():
    assert torch.ops.fastres._cuda_arch_list() == ""
    info = fastres.info()
    assert info["cuda_kernels"] is False
    assert info["cuda_arch_list"] is None
    assert "cuda" in info["unavailable"]


def _cpu_args(op):
    x = torch.randn(2, 3, 4, 5)
    scale, shift = torch.ones(3), torch.zeros(3)
    return {
        "add_act_cuda": (x, x, "relu"),
        "add_act_backward_cuda": (x, x, x, "relu"),
        "bn_act_cuda": (x, scale, shift, None, "relu"),
        "bn_act_backward_cuda": (x, x, scale, shift, None, "relu", False),
    }[op]


@needs_extension
@pytest.mark.parametrize("op", CUDA_OPS)
def test_cuda_op_rejects_cpu_tensors(op):
    """The dispatcher finds no CPU kernel and says so (built with or without CUDA)."""
    with pytest.raises(NotImplementedError, match=f"Could not run 'fastres::{op}' with arguments from the 'CPU' backend"):
        getattr(torch.ops.fastres, op)(*_cpu_args(op))


def _signature(op: str):
    """(arguments as (name, type, kwarg_only, alias/mutation), returns as (type, alias))."""
    schema = getattr(torch.ops.fastres, op).default._schema
    arguments = [(a.name, str(a.type), a.kwarg_only, a.alias_info is not None) for a in schema.arguments]
    returns = [(str(r.type), r.alias_info is not None) for r in schema.returns]
    return arguments, returns


@needs_extension
@pytest.mark.parametrize("family", ["add_act", "add_act_backward", "bn_act", "bn_act_backward"])
def test_schema_matches_triton_twin(family):
    """`<family>_cuda` and `<family>_triton` take the same arguments and return the same types."""
    twin = f"fastres::{family}_triton"
    if not _defined(twin):
        pytest.skip(f"{twin} is not defined (triton missing, or fastres/triton has no such op yet)")
    cuda_args, cuda_returns = _signature(f"{family}_cuda")
    triton_args, triton_returns = _signature(f"{family}_triton")
    assert cuda_args == triton_args, f"arguments differ:\n  cuda:   {cuda_args}\n  triton: {triton_args}"
    assert cuda_returns == triton_returns, f"returns differ:\n  cuda:   {cuda_returns}\n  triton: {triton_returns}"
