"""``backend=None`` routes by what the extension can run on this GPU.

* The CUDA kernels are machine code for the architectures of TORCH_CUDA_ARCH_LIST
  (default 8.0-9.0, no PTX): a GPU none of them runs on (a 10.x or 12.x, say) must
  route past ``"cuda"``, not fail at launch. Checked with a mocked compute capability.
* The conv's routing predicate and the C++ op's checks are one rule
  (``_conv_bn_act_cuda_unsupported``; the size rules are tested in test_cuda_conv.py).
"""
import pytest
import torch

from fastres import _extension, _triton_env, backends

needs_cuda_build = pytest.mark.skipif(
    _extension.unavailable_reason() is not None, reason=str(_extension.unavailable_reason())
)


@pytest.mark.parametrize(
    "archs,capability,runs",
    [
        (["8.0", "8.6", "8.9", "9.0"], (9, 0), True),
        (["8.0", "8.6", "8.9", "9.0"], (8, 7), True),  # sm_80 SASS runs on 8.7 (same major, newer minor)
        (["8.0", "8.6", "8.9", "9.0"], (10, 0), False),  # Blackwell: no SASS of major 10, no PTX
        (["8.0", "8.6", "8.9", "9.0"], (12, 0), False),
        (["8.0", "8.6", "8.9", "9.0"], (7, 5), False),
        (["9.0"], (8, 0), False),
        (["8.6"], (8, 0), False),  # SASS does not run on an older minor
        (["8.0", "9.0+PTX"], (12, 0), True),  # the driver compiles the PTX
        (["9.0+PTX"], (8, 9), False),
        (["9.0a"], (9, 0), True),
        (["9.0a"], (10, 0), False),
        (["Hopper"], (12, 0), True),  # a name cannot be checked: assumed to run
    ],
)
def test_runs_on(archs, capability, runs):
    assert _extension.runs_on(archs, capability) == runs


@pytest.fixture
def gpu_of_capability(monkeypatch):
    """Pretend cuda:0 has a given compute capability and the kernels were built for 8.0-9.0."""

    def set_capability(cap):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap)
        monkeypatch.setattr(_extension, "cuda_arch_list", lambda: ["8.0", "8.6", "8.9", "9.0"])
        _extension._arch_reason.cache_clear()
        _extension._conv_unsupported.cache_clear()

    yield set_capability
    _extension._arch_reason.cache_clear()
    _extension._conv_unsupported.cache_clear()


@needs_cuda_build
def test_no_cuda_backend_on_a_gpu_without_compiled_kernels(gpu_of_capability):
    dev = torch.device("cuda", 0)
    gpu_of_capability((12, 0))
    reason = backends.unavailable_reason("cuda", dev)
    assert reason is not None and "compute capability 12.0" in reason and "8.0 8.6 8.9 9.0" in reason
    assert "cuda" not in backends.usable_backends(dev)
    with pytest.raises(RuntimeError, match="backend 'cuda' is unavailable: .*compute capability 12.0"):
        backends.resolve("fastres.ops.bn_act", "cuda", dev, ["torch", "triton", "cuda"])
    # the conv's routing rule says so too (the op would fail to launch)
    why = _extension._conv_unsupported(torch.float16, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, 0, True)
    assert why is not None and "compute capability 12.0" in why


@needs_cuda_build
def test_cuda_backend_on_a_gpu_with_compiled_kernels(gpu_of_capability):
    dev = torch.device("cuda", 0)
    gpu_of_capability((9, 0))
    assert backends.unavailable_reason("cuda", dev) is None
    assert backends.usable_backends(dev, ["torch", "cuda"]) == ["cuda", "torch"]
    assert _extension._conv_unsupported(torch.float16, 64, 56, 56, 64, 3, 3, (1, 1), (1, 1), (1, 1), 1, 0, True) is None
    # the size rules route too: one 2^32-byte output image goes elsewhere
    why = _extension._conv_unsupported(torch.float16, 8, 2**15, 2**15, 8, 1, 1, (1, 1), (0, 0), (1, 1), 1, 0, True)
    assert why is not None and "2^31 bytes" in why


@pytest.mark.parametrize(
    "triton_version,numpy_version,usable",
    [("3.6.0", "2.3.5", True), ("3.6.0", "1.26.4", True), ("3.6.0", "2.4.0", False), ("3.8.0", "2.5.2", True)],
)
def test_interpreter_numpy_bound(monkeypatch, triton_version, numpy_version, usable):
    """Triton 3.6's interpreter fails with numpy >= 2.4 (TypeError converting one-element
    arrays to scalars; seen here with numpy 2.4.6 and 2.5.5, not 2.3.5): the triton
    backend says so on CPU instead of failing inside a kernel."""
    import numpy


    monkeypatch.setattr(numpy, "__version__", numpy_version)
    reason = _triton_env.interpreter_reason(triton_version)
    assert (reason is None) == usable, reason
    if not usable:
        assert "numpy < 2.4" in reason
