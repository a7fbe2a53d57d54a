"""Per-shape backend choice (``fastres/_tune.py``, ``fastres.tune``), on CPU.

The choice is made for CUDA tensors; here CPU is added to the tuned device
types, so that ``backend=None`` chooses among the candidates usable on CPU
(``"stock"``, and ``"triton"`` under the interpreter) with a fake timer that
says how fast each candidate is. Nothing here times anything for real.
"""
import dataclasses
import json
import subprocess
import sys
import threading
import warnings

import pytest
import torch

import fastres.tune
from conftest import TOL
from fastres import _tune, backends, ops, reference

needs_triton = pytest.mark.skipif(backends.unavailable_reason("triton", torch.device("cpu")) is not None,
                                  reason="needs the Triton interpreter")


class FakeTimer:
    """``_tune._timer``: (first ms, steady ms) per candidate from a table; counts the calls."""

    def __init__(self, ms, run=False):
        self.ms, self.run, self.calls = ms, run, []
        self.lock = threading.Lock()

    def __call__(self, name, fn, device):
        with self.lock:
            self.calls.append(name)
        if self.run:
            fn()
        if isinstance(self.ms[name], Exception):
            raise self.ms[name]
        return 10 * self.ms[name], self.ms[name]


@pytest.fixture
def tune(monkeypatch, tmp_path):
    """A clean table, a cache file under tmp_path, CPU tuned, measuring on."""
    monkeypatch.setenv("FASTRES_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.delenv("FASTRES_AUTOTUNE", raising=False)
    monkeypatch.delenv("FASTRES_TUNE_BUDGET_S", raising=False)
    monkeypatch.setattr(_tune, "TUNED_DEVICE_TYPES", ("cuda", "cpu"))
    _tune.clear(file=False)
    yield tmp_path / "tune.json"
    _tune.clear(file=False)


def _conv(n=2, c=4, h=7, w=9, k=6, residual=False, dtype=torch.float32, fmt=torch.contiguous_format, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g).to(dtype).contiguous(memory_format=fmt)
    weight = (torch.randn(k, c, 3, 3, generator=g) / 4).to(dtype)
    scale, shift = torch.rand(k, generator=g) + 0.5, torch.randn(k, generator=g)
    r = torch.randn(n, k, h, w, generator=g).to(dtype) if residual else None
    return x, weight, scale, shift, r


def _call(args, **kw):
    x, w, scale, shift, r = args
    return ops.conv_bn_act(x, w, scale, shift, r, padding=1, **kw)


def _ref(args, act="relu"):
    x, w, scale, shift, r = args
    return reference.conv_bn_act(x, w, scale, shift, r, [1, 1], [1, 1], [1, 1], 1, act)


def _key(args, act="relu"):
    x, w, _, _, r = args
    return _tune.conv_key(x, w, r, [1, 1], [1, 1], [1, 1], 1, act)


def _full(args, act="relu"):
    """The validated ``conv_bn_act`` arguments the tuner receives (3x3, padding 1)."""
    return (*args, [1, 1], [1, 1], [1, 1], 1, act)


def _choose(args, run=None, act="relu"):
    full = _full(args, act)
    return _tune.conv_backend(full, run or (lambda name: ops._conv_bn_act_on(name, full, None)))


# ----------------------------------------------------------------------------
# The choice
# ----------------------------------------------------------------------------


GRAD_MODES = {"default": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


@needs_triton
@pytest.mark.parametrize("mode", list(GRAD_MODES))
@pytest.mark.parametrize("fastest", ["triton", "stock"])
def test_first_call_measures_and_runs_the_fastest(tune, monkeypatch, fastest, mode):
    timer = FakeTimer({"triton": 1.0 if fastest == "triton" else 3.0, "stock": 2.0}, run=True)
    monkeypatch.setattr(_tune, "_timer", timer)
    args = _conv()
    with GRAD_MODES[mode]():
        y = _call(args)
    torch.testing.assert_close(y, _ref(args), **TOL[torch.float32])
    assert sorted(timer.calls) == ["stock", "triton"]  # each usable candidate once, on the real inputs
    entry = fastres.tune.choices()[_key(args)]
    assert entry["choice"] == fastest
    assert entry["ms"] == {"triton": timer.ms["triton"], "stock": 2.0}
    assert entry["first_ms"] == {"triton": 10 * timer.ms["triton"], "stock": 20.0}
    _call(args)  # known now: no more measuring
    assert len(timer.calls) == 2
    assert fastres.tune.used()[_key(args)] == {**entry, "how": "measured"}  # what the benchmark report prints


def test_candidates_on_cpu_and_the_static_rule():
    args = _conv()
    usable = _tune.candidates(_full(args))
    expected = ("stock", "triton") if backends.unavailable_reason("triton", args[0].device) is None else ("stock",)
    assert usable == expected  # cudnn and cuda need CUDA tensors
    assert _tune.static_choice(("stock", "triton", "cuda", "cudnn")) == "cudnn"
    assert _tune.static_choice(("stock", "triton", "cuda")) == "cuda"
    assert _tune.static_choice(("stock",)) == "stock"


def test_cudnn_candidate_only_with_a_fused_form(monkeypatch):
    """Without a fused cuDNN epilogue the cudnn backend is conv + bn_act, i.e. the stock candidate."""
    cudnn = dataclasses.replace(backends.REGISTRY["cudnn"], unavailable=lambda device: None)
    monkeypatch.setitem(backends.REGISTRY, "cudnn", cudnn)
    args = _conv()
    assert "cudnn" in _tune.candidates(_full(args, "relu"))
    assert "cudnn" not in _tune.candidates(_full(args, "silu"))
    assert "cudnn" not in _tune.candidates(_full(tuple(t if t is None else t.double() for t in args), "relu"))


def test_a_failing_candidate_is_disqualified(tune, monkeypatch):
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"triton": RuntimeError("out of resources"), "stock": 2.0}))
    args = _conv()
    if len(_tune.candidates(_full(args))) < 2:
        pytest.skip("needs two candidates (the Triton interpreter)")
    with pytest.warns(RuntimeWarning, match="backend 'triton' disqualified for .*out of resources"):
        assert _choose(args) == "stock"
    entry = fastres.tune.choices()[_key(args)]
    assert "out of resources" in entry["disqualified"]["triton"]


def test_budget_bounds_the_first_call(tune, monkeypatch):
    """Once the time spent exceeds FASTRES_TUNE_BUDGET_S, the remaining candidates are not tried."""
    monkeypatch.setenv("FASTRES_TUNE_BUDGET_S", "0.001")
    timer = FakeTimer({"cudnn": 5.0, "stock": 1.0, "cuda": 0.5, "triton": 0.1})
    monkeypatch.setattr(_tune, "_timer", timer)
    x, w, _, _, _ = _conv()
    entry = _tune.measure("k", ("cudnn", "stock", "cuda", "triton"), lambda name: None, x.device, None)
    assert timer.calls == ["cudnn"]
    assert entry["choice"] == "cudnn"
    assert set(entry["skipped"]) == {"stock", "cuda", "triton"}
    assert entry["tune_ms"] == 10 * 5.0 + _tune.REPS * 5.0
    monkeypatch.setenv("FASTRES_TUNE_BUDGET_S", "ten")
    with pytest.raises(ValueError, match="FASTRES_TUNE_BUDGET_S to be a number of seconds, got 'ten'"):
        _tune.measure("k", ("cudnn", "stock"), lambda name: None, x.device, None)


class FakeCandidates:
    """``run(name)`` of the tuner: the reference's result, or a fault per candidate."""

    def __init__(self, args, faults):
        self.expected = _ref(args)
        self.faults = faults

    def __call__(self, name):
        fault = self.faults.get(name)
        if fault == "wrong":
            return self.expected + 1.0
        if fault == "nan":
            return torch.full_like(self.expected, float("nan"))
        if fault == "raise":
            raise RuntimeError("illegal memory access")
        return self.expected.clone()


@pytest.mark.parametrize("fault", ["wrong", "nan", "raise"])
def test_a_wrong_candidate_never_wins(tune, monkeypatch, fault, capsys):
    """The fastest candidate is checked against the reference first: a wrong result, non-finite
    values or an exception disqualify it for the key (warned once, kept in the table and shown
    by --show); the right one is chosen."""
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"cudnn": 0.5, "stock": 2.0}))
    args = _conv()
    run = FakeCandidates(args, {"cudnn": fault})
    with pytest.warns(RuntimeWarning, match=r"backend 'cudnn' disqualified for cpu\|fp32.*c4h7w9"):
        entry = _tune.measure(_key(args), ("cudnn", "stock"), run, torch.device("cpu"), lambda: _ref(args))
    assert entry["choice"] == "stock" and set(entry["ms"]) == {"stock"}
    assert set(entry["disqualified"]) == {"cudnn"}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per backend and key
        _tune.measure(_key(args), ("cudnn", "stock"), run, torch.device("cpu"), lambda: _ref(args))
    assert json.loads(tune.read_text())["entries"][_key(args)]["disqualified"] == entry["disqualified"]
    _tune.clear(file=False)
    assert fastres.tune.main(["--show"]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith(_key(args)))
    assert line.split()[1:4] == ["stock", "-", "-"] and "disqualified" in line
    assert f"disqualified: cudnn for {_key(args)}: " in out


def test_check_output_tolerances():
    expected = torch.randn(2, 3, 4, 5)
    assert _tune.check_output(expected + 1e-4 * expected.abs().max(), expected) is None
    assert "exceeds" in _tune.check_output(expected + 0.1 * expected.abs().max(), expected)
    assert "expected a (2, 3, 4, 5)" in _tune.check_output(expected[:1], expected)
    assert "expected a" in _tune.check_output(None, expected)
    inf = expected.clone()
    inf[0, 0, 0, 0] = float("inf")
    assert "non-finite" in _tune.check_output(inf, expected)
    assert _tune.check_output(inf, inf) is None  # non-finite where the reference is too: PyTorch's semantics
    half = expected.to(torch.bfloat16)
    assert _tune.check_output(half, expected.to(torch.bfloat16)) is None


@needs_triton
def test_model_run_in_inference_mode(tune, monkeypatch):
    """A fastres block built and run inside inference_mode, backend=None: measured, then the choice runs.
    (CPU stands for a GPU here: the tuner chooses among triton and stock.)"""
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"triton": 1.0, "stock": 2.0}, run=True))
    with torch.inference_mode():
        block = fastres.nn.BasicBlock(4, 4).eval()
        x = torch.randn(1, 4, 5, 6)
        y = block(x)
        expected = fastres.set_backend(block, "torch")(x)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    assert {e["choice"] for e in fastres.tune.choices().values()} == {"triton"}


# ----------------------------------------------------------------------------
# Keys
# ----------------------------------------------------------------------------


def test_key_fields():
    base = _key(_conv())
    assert base == "cpu|fp32|nchw|c4h7w9-k6r3s3-s1,1-p1,1-d1,1-g1|n2|relu"
    assert _key(_conv(n=3)) == _key(_conv(n=4)) != _key(_conv(n=5))  # batch buckets: powers of two
    assert [_tune.batch_bucket(n) for n in (1, 2, 3, 64, 65, 256)] == [1, 2, 4, 64, 128, 256]
    assert _key(_conv(dtype=torch.bfloat16)).split("|")[1] == "bf16"
    assert _key(_conv(fmt=torch.channels_last)).split("|")[2] == "nhwc"
    assert _key(_conv(h=8)).split("|")[3] == "c4h8w9-k6r3s3-s1,1-p1,1-d1,1-g1"
    assert _key(_conv(residual=True)).endswith("|relu+res")
    assert _key(_conv(), act="silu").endswith("|silu")


# ----------------------------------------------------------------------------
# The cache file
# ----------------------------------------------------------------------------


def test_cache_path_default_and_override(monkeypatch, tmp_path):
    monkeypatch.delenv("FASTRES_TUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert fastres.tune.cache_path() == tmp_path / "fastres" / "tune.json"
    monkeypatch.setenv("FASTRES_TUNE_CACHE", str(tmp_path / "x.json"))
    assert fastres.tune.cache_path() == tmp_path / "x.json"


def test_cache_file_round_trip(tune, monkeypatch):
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"triton": 1.0, "stock": 2.0, "cuda": 3.0}))
    args = _conv()
    x = args[0]
    _tune.measure(_key(args), ("stock", "triton", "cuda"), lambda name: None, x.device, None)
    data = json.loads(tune.read_text())
    assert data["format"] == "fastres-tune" and data["versions"] == _tune.versions()
    assert data["entries"][_key(args)]["choice"] == "triton"
    _tune.clear(file=False)  # a new process: memory empty, the file remembers
    monkeypatch.setattr(_tune, "_timer", FakeTimer({}))  # any measuring would fail
    assert _tune.lookup(_key(args))["choice"] == "triton"
    fastres.tune.clear()
    assert not tune.exists() and fastres.tune.choices() == {}


def test_two_processes_merge_into_one_file(tune, monkeypatch):
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"triton": 1.0, "stock": 2.0}))
    dev = torch.device("cpu")
    _tune.measure("a", ("stock", "triton"), lambda name: None, dev, None)
    _tune.clear(file=False)  # another process that has not read the file yet
    with _tune._LOCK:
        _tune._STATE["loaded"] = True  # ... and measures before reading it
    _tune.measure("b", ("stock", "triton"), lambda name: None, dev, None)
    assert set(json.loads(tune.read_text())["entries"]) == {"a", "b"}


@pytest.mark.parametrize("content", ["{not json", '{"some": "other tool"}', "[1, 2]",
                                     '{"format": "fastres-tune", "version": 1, "versions": {}, '
                                     '"entries": {"k": {"choice": "mkl", "ms": {}}}}'],
                         ids=["corrupt", "foreign", "list", "bad-entry"])
def test_unreadable_file_is_ignored_with_a_warning_and_left_alone(tune, monkeypatch, content):
    tune.write_text(content)
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"triton": 1.0, "stock": 2.0}))
    with pytest.warns(UserWarning, match="not a fastres tune file"):
        entry = _tune.measure("k", ("stock", "triton"), lambda name: None, torch.device("cpu"), None)
    assert entry["choice"] == "triton"
    assert _tune.lookup("k")["choice"] == "triton"  # remembered in memory
    assert tune.read_text() == content  # never overwritten
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _tune.measure("k2", ("stock", "triton"), lambda name: None, torch.device("cpu"), None)  # warned once
    fastres.tune.clear()
    assert tune.read_text() == content  # clear() deletes only a fastres tune file


def test_other_versions_are_ignored_then_replaced(tune, monkeypatch):
    old = {**_tune.versions(), "fastres": "0.0.1"}
    tune.write_text(json.dumps({"format": "fastres-tune", "version": 1, "versions": old,
                                "entries": {"k": {"choice": "stock", "ms": {"stock": 1.0}}}}))
    assert _tune.lookup("k") is None  # measured by another fastres: re-measure
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"triton": 1.0, "stock": 2.0}))
    _tune.measure("k", ("stock", "triton"), lambda name: None, torch.device("cpu"), None)
    data = json.loads(tune.read_text())
    assert data["versions"] == _tune.versions() and data["entries"]["k"]["choice"] == "triton"


# ----------------------------------------------------------------------------
# When nothing is measured
# ----------------------------------------------------------------------------


def test_autotune_off_uses_known_else_static(tune, monkeypatch):
    monkeypatch.setenv("FASTRES_AUTOTUNE", "0")
    timer = FakeTimer({})
    monkeypatch.setattr(_tune, "_timer", timer)
    args = _conv()
    usable = _tune.candidates(_full(args))
    assert _choose(args) == _tune.static_choice(usable)
    assert timer.calls == [] and fastres.tune.choices() == {}  # the static rule is not remembered
    assert fastres.tune.used(reset=True)[_key(args)]["how"] == "static"
    assert fastres.tune.used() == {}
    with _tune._LOCK:
        _tune._TABLE[_key(args)] = {"choice": "stock", "ms": {"stock": 1.0}}
    assert _choose(args) == "stock"
    torch.testing.assert_close(_call(args), _ref(args), **TOL[torch.float32])


def test_explicit_backend_is_never_tuned(tune, monkeypatch):
    timer = FakeTimer({})
    monkeypatch.setattr(_tune, "_timer", timer)
    args = _conv()
    torch.testing.assert_close(_call(args, backend="torch"), _ref(args), **TOL[torch.float32])
    assert timer.calls == [] and fastres.tune.choices() == {}


def test_graph_capture_and_jit_trace_never_measure(tune, monkeypatch):
    timer = FakeTimer({})
    monkeypatch.setattr(_tune, "_timer", timer)
    args = _conv()
    static = _tune.static_choice(_tune.candidates(_full(args)))
    monkeypatch.setattr(_tune, "_capturing", lambda device: True)
    assert _choose(args) == static
    monkeypatch.setattr(_tune, "_capturing", lambda device: False)
    traced = torch.jit.trace(lambda x: _call((x, *args[1:])), (args[0],), check_trace=False)
    torch.testing.assert_close(traced(args[0]), _ref(args), **TOL[torch.float32])
    assert timer.calls == [] and fastres.tune.choices() == {}


def test_torch_compile_never_measures_and_does_not_break_the_graph(tune, monkeypatch):
    timer = FakeTimer({})
    monkeypatch.setattr(_tune, "_timer", timer)
    args = _conv()
    with _tune._LOCK:  # a known choice: the compiled graph uses it
        _tune._TABLE[_key(args)] = {"choice": "stock", "ms": {"stock": 1.0}}
    torch._dynamo.reset()
    f = torch.compile(lambda x, w, scale, shift: _call((x, w, scale, shift, None)), fullgraph=True,
                      backend="aot_eager")
    torch.testing.assert_close(f(*args[:4]), _ref(args), **TOL[torch.float32])
    other = _conv(h=5)  # unknown: the static rule, still without measuring
    torch.testing.assert_close(f(*other[:4]), _ref(other), **TOL[torch.float32])
    assert timer.calls == [] and _key(other) not in fastres.tune.choices()
    used = fastres.tune.used()
    assert (used[_key(args)]["how"], used[_key(other)]["how"]) == ("known", "static")
    torch._dynamo.reset()


def test_torch_export_never_measures(tune, monkeypatch):
    timer = FakeTimer({})
    monkeypatch.setattr(_tune, "_timer", timer)
    args = _conv()

    class Conv(torch.nn.Module):
        def forward(self, x, w, scale, shift):
            return _call((x, w, scale, shift, None))

    ep = torch.export.export(Conv(), tuple(args[:4]))
    torch.testing.assert_close(ep.module()(*args[:4]), _ref(args), **TOL[torch.float32])
    assert timer.calls == [] and fastres.tune.choices() == {}
    assert fastres.tune.used()[_key(args)]["how"] == "static"


# ----------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------


def test_threads_measure_each_key_once(tune, monkeypatch):
    timer = FakeTimer({"triton": 1.0, "stock": 2.0})
    monkeypatch.setattr(_tune, "_timer", timer)
    monkeypatch.setattr(_tune, "candidates", lambda *a: ("stock", "triton"))
    shapes = [_conv(h=h) for h in (5, 6, 7, 8)]
    errors, results = [], []

    def work(i):
        try:
            for j in range(20):
                results.append(_choose(shapes[(i + j) % len(shapes)]))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert set(results) == {"triton"} and len(results) == 160
    assert sorted(timer.calls) == ["stock"] * 4 + ["triton"] * 4  # each key measured exactly once
    assert set(fastres.tune.choices()) == {_key(s) for s in shapes}
    assert set(json.loads(tune.read_text())["entries"]) == {_key(s) for s in shapes}


# ----------------------------------------------------------------------------
# python -m fastres.tune
# ----------------------------------------------------------------------------


def test_cli_show_prints_the_table(tune, monkeypatch, capsys):
    monkeypatch.setattr(_tune, "_timer", FakeTimer({"triton": 1.0, "stock": 2.5}))
    args = _conv()
    _tune.measure(_key(args), ("stock", "triton"), lambda name: None, torch.device("cpu"), None)
    _tune.clear(file=False)  # --show reads the file
    assert fastres.tune.main(["--show"]) == 0
    out = capsys.readouterr().out
    assert f"cache: {tune}" in out
    line = next(ln for ln in out.splitlines() if ln.startswith(_key(args)))
    assert line.split()[1:] == ["triton", "-", "1.0000", "(10.0)", "-", "2.5000", "(25.0)", "52.5"]


def test_cli_runs_as_a_module(tune):
    env = {**__import__("os").environ, "FASTRES_TUNE_CACHE": str(tune)}
    out = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "fastres.tune", "--path"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tune)


# ----------------------------------------------------------------------------
# On a GPU (skipped without one): real timing
# ----------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("act", ["relu", "silu"])
def test_gpu_first_call_times_every_usable_candidate(monkeypatch, tmp_path, act, residual):
    monkeypatch.setenv("FASTRES_TUNE_CACHE", str(tmp_path / "tune.json"))
    monkeypatch.delenv("FASTRES_AUTOTUNE", raising=False)
    _tune.clear(file=False)
    try:
        x, w, scale, shift, r = (None if t is None else t.cuda() for t in _conv(n=8, c=32, h=14, w=14, k=64,
                                                                                  residual=residual,
                                                                                  dtype=torch.bfloat16,
                                                                                  fmt=torch.channels_last))
        w = w.contiguous(memory_format=torch.channels_last)
        y = ops.conv_bn_act(x, w, scale, shift, r, padding=1, activation=act)
        usable = _tune.candidates((x, w, scale, shift, r, [1, 1], [1, 1], [1, 1], 1, act))
        entry = fastres.tune.choices()[_tune.conv_key(x, w, r, [1, 1], [1, 1], [1, 1], 1, act)]
        assert set(entry["ms"]) | set(entry.get("skipped", {})) == set(usable)
        assert entry["choice"] in entry["ms"] and ("cudnn" in usable) == (act == "relu")
        up = lambda t: None if t is None else t.float()  # noqa: E731
        with torch.backends.cudnn.flags(allow_tf32=False):
            ref = reference.conv_bn_act(up(x), up(w), scale, shift, up(r), [1, 1], [1, 1], [1, 1], 1, act)
        torch.testing.assert_close(y, ref.to(y.dtype), rtol=2e-2, atol=2e-2)
        assert y.stride() == ref.stride()
    finally:
        _tune.clear(file=False)
