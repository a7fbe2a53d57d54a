"""How the Triton ops launch: on the tensors' device, and with no argument aliasing another.

* Triton launches on the current CUDA device, so every Triton op runs under
  ``fastres.triton._utils.device_guard`` of its tensors' device (the CUDA ops use
  ``CUDAGuard``). Without a GPU the guard is checked with a recording stand-in; on a
  machine with two GPUs, for real.
* No launch passes one tensor for two pointer arguments (the bn_act kernels once
  passed ``grad_x`` for the unused ``gz_ptr`` and ``x`` for the unused residual):
  under ``torch.compile`` a functionalized kernel call may clone an argument it
  believes written, and an alias makes that wrong or wasteful.
"""
import pytest
import torch

from fastres import backends, ops
from conftest import DEVICE, ConvCase, conv_inputs

pytestmark = pytest.mark.skipif(
    backends.unavailable_reason("triton", DEVICE) is not None,
    reason=str(backends.unavailable_reason("triton", DEVICE)),
)


def _calls(dtype=torch.float32):
    """One call of every Triton op family, forward and backward, on DEVICE."""
    x = torch.randn(2, 4, 3, 5, device=DEVICE, dtype=dtype)
    r = torch.randn_like(x)
    scale, shift = torch.rand(4, device=DEVICE) + 0.5, torch.randn(4, device=DEVICE)

    def add_act():
        a, b = x.clone().requires_grad_(), r.clone().requires_grad_()
        ops.add_act(a, b, "silu", backend="triton").sum().backward()

    def bn_act(res):
        a = x.clone().requires_grad_()
        b = r.clone().requires_grad_() if res else None
        ops.bn_act(a, scale, shift, b, "relu", backend="triton").sum().backward()

    def conv():
        case = ConvCase(1, 4, 5, 5, 8, 3, 3, padding=(1, 1))
        cx, w, s, t, cr = conv_inputs(case, dtype)
        ops.conv_bn_act(cx, w, s, t, cr, padding=1, backend="triton")

    return {"add_act": add_act, "bn_act": lambda: bn_act(False), "bn_act+residual": lambda: bn_act(True),
            "conv_bn_act": conv}


@pytest.mark.parametrize("call", list(_calls()))
def test_ops_run_under_the_tensors_device_guard(call, monkeypatch):
    from fastres.triton import _utils

    seen = []
    real = _utils.device_guard

    def recording_guard(t):
        seen.append(t.device)
        return real(t)

    monkeypatch.setattr(_utils, "device_guard", recording_guard)
    _calls()[call]()
    assert seen and all(d == torch.device(DEVICE) or d.type == DEVICE.type for d in seen), seen


def test_device_guard_selects_the_tensors_device():
    """The guard for a tensor on cuda:1 is torch.cuda.device(1) (built without touching a GPU)."""
    from fastres.triton._utils import device_guard

    class FakeCuda1:
        device = torch.device("cuda", 1)

    guard = device_guard(FakeCuda1())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(device_guard(torch.zeros(1)), torch.cuda.device)  # CPU: no guard


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_runs_on_a_non_current_device():
    x = torch.randn(2, 8, 6, 6, device="cuda:1")
    r = torch.randn_like(x)
    scale, shift = torch.rand(8, device="cuda:1"), torch.randn(8, device="cuda:1")
    with torch.cuda.device(0):
        y = ops.bn_act(x, scale, shift, r, "relu", backend="triton")
        torch.cuda.synchronize(1)
    torch.testing.assert_close(y, ops.bn_act(x, scale, shift, r, "relu", backend="torch"))


@pytest.mark.parametrize("call", list(_calls()))
def test_no_launch_aliases_its_arguments(call, monkeypatch):
    import fastres.triton.conv as conv_mod
    import fastres.triton.elementwise as ew_mod

    launches = []

    def recording_wrap(real_wrap):
        def wrap(kernel):
            launcher = real_wrap(kernel)

            class Grid:
                def __getitem__(self, grid):
                    def launch(*args, **kwargs):
                        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
                        launches.append(tensors)
                        return launcher[grid](*args, **kwargs)

                    return launch

            return Grid()

        return wrap

    monkeypatch.setattr(ew_mod, "wrap", recording_wrap(ew_mod.wrap))
    monkeypatch.setattr(conv_mod, "wrap", recording_wrap(conv_mod.wrap))
    _calls()[call]()
    assert launches
    for tensors in launches:
        storages = [t.untyped_storage().data_ptr() for t in tensors if t.numel() > 0]
        assert len(storages) == len(set(storages)), "a launch passed one tensor (or views of one) twice"
