"""Per-shape backend choice for ``fastres.ops.conv_bn_act(backend=None)`` on CUDA.

The candidates are the registry's tunable backends (``fastres.backends``): the
fused kernels ``"cuda"`` and ``"triton"``, ``"cudnn"`` (cuDNN's fused convolution
with the BN folded in; only for the epilogues cuDNN fuses) and ``"stock"``
(PyTorch's convolution, then the fused ``bn_act`` kernel). The first call of a
shape times every usable candidate on its own inputs (each candidate's first
call, which includes Triton's autotuning and cuDNN's algorithm search, and then
the median of a few steady-state calls), checks each one's output against the
reference (:func:`check_output`: a candidate that raises, or differs from it, is
disqualified for that key and warned about once) and runs the fastest of those
left from then on. Choices are remembered per key

    (device name, dtype, layout, conv geometry, batch bucket, epilogue)

in memory and in a JSON file (:func:`cache_path`) written for the exact library
versions (torch, CUDA, cuDNN, triton, fastres, the NVIDIA driver): a file
written by other versions is ignored and replaced, so new versions re-measure.

* ``FASTRES_AUTOTUNE=0``: nothing is measured; known choices (memory, file)
  still apply, else the static rule (the first usable by the backends' static rank).
* ``FASTRES_TUNE_CACHE``: the file's path (default
  ``$XDG_CACHE_HOME/fastres/tune.json``, ``~/.cache`` without it).
* ``FASTRES_TUNE_BUDGET_S`` (default 10): the bound on a first call. Candidates
  are timed in the registry's measuring order (cheap first calls first); once the time spent on a key exceeds the
  budget, the rest are not tried, so a first call lasts at most the budget
  plus one candidate's measurement.
* ``fastres.set_backend(model, name)`` / ``backend=name`` bypass all of this.
* ``torch.compile`` (and ``torch.export``), ``torch.jit.trace`` and CUDA-graph
  capture never measure: they use a known choice, else the static rule. Under
  ``torch.compile`` the choice is a constant of the trace (no graph break).
* Several processes (DDP ranks) each measure and may choose differently; all
  candidates compute the same function, so outputs differ across ranks only by
  the kernels' rounding (and, for ``"cudnn"``, the folding's, docs/tuning.md);
  nothing requires bitwise-equal activations across ranks. Pointing all ranks
  at one measured file (``FASTRES_TUNE_CACHE``) makes them agree.

``python -m fastres.tune --show`` prints the file's table with the measured
times per candidate; ``--clear`` deletes it. The public names are re-exported
by ``fastres.tune`` (which the package does not import, so that ``python -m
fastres.tune`` runs it once).
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import pathlib
import statistics
import tempfile
import threading
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from fastres import _layout, _triton_env, _version, backends, reference

# Device types whose backend=None choice is measured.
TUNED_DEVICE_TYPES = ("cuda",)
FORMAT, VERSION = "fastres-tune", 1
REPS = 5  # steady-state calls timed per candidate

_LOCK = threading.Lock()  # guards _TABLE, _USED, _MEMO and _STATE
_MEASURE_LOCK = threading.Lock()  # one key measured at a time
_TABLE: Dict[str, dict] = {}  # key string -> entry, for this process's library versions
_USED: Dict[str, dict] = {}  # key string -> {"choice", "how"}: what backend=None ran (see used())
_MEMO: Dict[tuple, tuple] = {}  # call signature -> (key, candidates), see _key_and_candidates
_STATE = {"loaded": False, "writable": True}
_WARNED: set = set()  # (backend, key) pairs whose disqualification was warned about


# ----------------------------------------------------------------------------
# Settings and environment
# ----------------------------------------------------------------------------


def cache_path() -> pathlib.Path:
    """The JSON file of measured choices (``FASTRES_TUNE_CACHE`` overrides the default)."""
    override = os.environ.get("FASTRES_TUNE_CACHE")
    if override:
        return pathlib.Path(override).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "fastres" / "tune.json"


def autotune_enabled() -> bool:
    """False when ``FASTRES_AUTOTUNE=0``: no measuring, known choices or the static rule."""
    return os.environ.get("FASTRES_AUTOTUNE", "1") != "0"


def budget_ms() -> float:
    """``FASTRES_TUNE_BUDGET_S`` (default 10) in ms; a value that is not a number raises, naming it."""
    value = os.environ.get("FASTRES_TUNE_BUDGET_S", "10")
    try:
        return 1000.0 * float(value)
    except ValueError:
        raise ValueError(
            f"fastres.tune: expected FASTRES_TUNE_BUDGET_S to be a number of seconds, got {value!r}"
        ) from None


def _driver_version() -> Optional[str]:
    try:
        with open("/proc/driver/nvidia/version") as f:
            return f.readline().strip() or None
    except OSError:
        return None


@functools.lru_cache(maxsize=None)
def versions() -> Dict[str, Optional[str]]:
    """The library versions a measured table is valid for."""
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": None if cudnn is None else str(cudnn),
        "triton": _triton_env.VERSION, "fastres": _version.__version__, "driver": _driver_version(),
    }


@torch.compiler.assume_constant_result
@functools.lru_cache(maxsize=None)
def device_name(device_type: str, index: int) -> str:
    if device_type == "cuda":
        return torch.cuda.get_device_name(index)
    return device_type


# ----------------------------------------------------------------------------
# Keys and candidates
# ----------------------------------------------------------------------------

_DTYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def batch_bucket(n: int) -> int:
    """The power of two >= ``n``: batch sizes in one bucket share a choice."""
    return 1 << max(int(n) - 1, 0).bit_length()


def conv_key(x: torch.Tensor, weight: torch.Tensor, residual: Optional[torch.Tensor], stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], groups: int, activation: str) -> str:
    """``device|dtype|layout|geometry|batch bucket|epilogue`` of one ``conv_bn_act`` call."""
    index = x.device.index if x.device.index is not None else (
        torch.cuda.current_device() if x.device.type == "cuda" else 0)
    layout = "nhwc" if _layout.conv_out_channels_last(x, weight) else "nchw"
    _, c, h, w = (int(v) for v in x.shape)
    k, _, r, s = (int(v) for v in weight.shape)
    geometry = (f"c{c}h{h}w{w}-k{k}r{r}s{s}-s{stride[0]},{stride[1]}-p{padding[0]},{padding[1]}"
                f"-d{dilation[0]},{dilation[1]}-g{groups}")
    epilogue = activation + ("+res" if residual is not None else "")
    return "|".join((device_name(x.device.type, index), _DTYPES[x.dtype], layout, geometry,
                     f"n{batch_bucket(x.shape[0])}", epilogue))


def candidates(args: Sequence) -> Tuple[str, ...]:
    """The usable candidates for this ``conv_bn_act`` call (validated ``args``), in measuring order."""
    return tuple(name for name in _available(str(args[0].device)) if backends.tune_takes(name, args))


@torch.compiler.assume_constant_result  # a constant of the trace under torch.compile
def _available(device: str) -> Tuple[str, ...]:
    """The tunable backends that can run on ``device`` (any shape)."""
    return backends.tune_available(torch.device(device))


def static_choice(usable: Sequence[str]) -> str:
    """The static rule: the first of ``usable`` by the backends' static rank."""
    return backends.tune_static_choice(usable)


# ----------------------------------------------------------------------------
# The table: memory and file
# ----------------------------------------------------------------------------


def _valid_entry(e) -> bool:
    names = backends.tune_names()
    return (isinstance(e, dict) and e.get("choice") in names and isinstance(e.get("ms"), dict)
            and all(k in names and isinstance(v, (int, float)) for k, v in e["ms"].items()))


def _read_file() -> Optional[dict]:
    """The file's entries for these versions ({} when absent or written by other versions), or
    None (with a warning) when it is not a readable fastres tune file: then it is never written."""
    path = cache_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        warnings.warn(f"fastres.tune: cannot read {path} ({e}); choices are kept in memory only", stacklevel=3)
        return None
    try:
        data = json.loads(text)
        ok = (isinstance(data, dict) and data.get("format") == FORMAT and data.get("version") == VERSION
              and isinstance(data.get("versions"), dict) and isinstance(data.get("entries"), dict)
              and all(isinstance(k, str) and _valid_entry(e) for k, e in data["entries"].items()))
    except ValueError:
        ok = False
    if not ok:
        warnings.warn(
            f"fastres.tune: ignoring {path}: not a fastres tune file (corrupt or foreign); it is left "
            "untouched and choices are kept in memory only (delete it, or set FASTRES_TUNE_CACHE)",
            stacklevel=3)
        return None
    if data["versions"] != versions():
        return {}  # written by other library versions: re-measure, then replace it
    return data["entries"]


def _ensure_loaded() -> None:
    if _STATE["loaded"]:
        return
    with _LOCK:
        if _STATE["loaded"]:
            return
        entries = _read_file()
        _STATE["writable"] = entries is not None
        for k, e in (entries or {}).items():
            _TABLE.setdefault(k, e)
        _STATE["loaded"] = True


def _write_file() -> None:
    """Merge this process's entries into the file (atomically replaced)."""
    with _LOCK:
        if not _STATE["writable"]:
            return
        path = cache_path()
        on_disk = _read_file()
        if on_disk is None:
            _STATE["writable"] = False
            return
        data = {"format": FORMAT, "version": VERSION, "versions": versions(), "entries": {**on_disk, **_TABLE}}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except OSError as e:
            _STATE["writable"] = False
            warnings.warn(f"fastres.tune: cannot write {path} ({e}); choices are kept in memory only",
                          stacklevel=3)


def lookup(key: str) -> Optional[dict]:
    """The remembered entry of ``key`` (memory, then the file), or None."""
    _ensure_loaded()
    with _LOCK:
        return _TABLE.get(key)


def choices() -> Dict[str, dict]:
    """A copy of every remembered entry (key string -> entry) of this process."""
    _ensure_loaded()
    with _LOCK:
        return {k: dict(e) for k, e in _TABLE.items()}


def clear(file: bool = True) -> None:
    """Forget every choice: in memory, and (``file``) the cache file if it is a fastres tune file."""
    with _LOCK:
        _TABLE.clear()
        _USED.clear()
        _MEMO.clear()
        _WARNED.clear()
        _STATE["loaded"] = False
        _STATE["writable"] = True
    if file:
        path = cache_path()
        if path.exists() and _read_file() is not None:
            path.unlink()


# ----------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timer(name: str, fn: Callable[[], object], device: torch.device) -> Tuple[float, float]:
    """(first call ms, median steady-state ms) of candidate ``name``'s ``fn`` on ``device``
    (CUDA events on a GPU)."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    first = 1e3 * (time.perf_counter() - t0)
    times = []
    for _ in range(REPS):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
    return first, statistics.median(times)


# Largest error of a candidate against the reference, relative to the reference's largest
# magnitude: TF32 or a low-precision rounding of the folded weight stay well inside, a wrong
# kernel (a bad index, a missing epilogue term) is far outside.
CHECK_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-2, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def check_output(out, expected: torch.Tensor) -> Optional[str]:
    """Why candidate output ``out`` is not the reference's ``expected``, or None.

    Disqualifying: not a tensor of ``expected``'s shape and dtype; non-finite where the
    reference is finite; ``max|out - expected| > tol * max|expected|`` (fp32 math,
    :data:`CHECK_TOLERANCE` per dtype).
    """
    if not isinstance(out, torch.Tensor) or out.shape != expected.shape or out.dtype != expected.dtype:
        got = f"{tuple(out.shape)} {out.dtype}" if isinstance(out, torch.Tensor) else type(out).__name__
        return f"returned {got}, expected a {tuple(expected.shape)} {expected.dtype} tensor"
    ct = reference.compute_dtype(out.dtype)
    tol = CHECK_TOLERANCE[out.dtype]
    out, expected = out.to(ct), expected.to(ct)
    finite = torch.isfinite(expected)
    if bool((finite & ~torch.isfinite(out)).any()):
        return "non-finite values where the reference is finite"
    if not bool(finite.any()):
        return None
    scale = float(expected[finite].abs().max())
    error = float((out - expected)[finite].abs().max())
    if error > tol * max(scale, torch.finfo(ct).tiny):
        return f"max |error| {error:.3g} exceeds {tol:g} x max |reference| {scale:.3g}"
    return None


def _disqualify(key: str, name: str, why: str, disqualified: Dict[str, str]) -> None:
    disqualified[name] = why[:300]
    with _LOCK:
        new = (name, key) not in _WARNED
        _WARNED.add((name, key))
    if new:
        warnings.warn(f"fastres.tune: backend {name!r} disqualified for {key}: {why}", RuntimeWarning,
                      stacklevel=5)


def measure(key: str, usable: Sequence[str], run: Callable[[str], object], device: torch.device,
            trusted: Optional[Callable[[], torch.Tensor]]) -> dict:
    """Time each of ``usable`` (``run(name)`` computes the call with that candidate), check its
    output against ``trusted()`` (the reference's result; None checks nothing: timings alone)
    and remember the fastest candidate that passed."""
    _ensure_loaded()
    spent, ms, first_ms, skipped, disqualified = 0.0, {}, {}, {}, {}
    expected = None
    with torch.no_grad():
        for name in usable:
            if spent > budget_ms():
                skipped[name] = "first-call budget spent (FASTRES_TUNE_BUDGET_S)"
                continue
            try:
                first, steady = _timer(name, lambda: run(name), device)
                why = None
                if trusted is not None:
                    expected = trusted() if expected is None else expected
                    why = check_output(run(name), expected)
            except Exception as e:  # noqa: BLE001 - a candidate failing here is disqualified, not fatal
                why = f"{type(e).__name__}: {e}"
            if why is not None:
                _disqualify(key, name, why, disqualified)
                continue
            first_ms[name], ms[name] = round(first, 4), round(steady, 4)
            spent += first + REPS * steady
    passed = [n for n in usable if n not in disqualified] or list(usable)
    choice = min(ms, key=ms.get) if ms else static_choice(passed)
    entry = {"choice": choice, "ms": ms, "first_ms": first_ms, "tune_ms": round(spent, 3)}
    if skipped:
        entry["skipped"] = skipped
    if disqualified:
        entry["disqualified"] = disqualified
    with _LOCK:
        _TABLE[key] = entry
    _write_file()
    return entry


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _key_and_candidates(args):
    """``conv_key`` and ``candidates``, memoized on everything they read (tens of microseconds
    of Python per conv call otherwise)."""
    x, weight, _, _, residual, stride, padding, dilation, groups, activation = args
    memo = (x.device, x.dtype, tuple(x.shape), x.stride(), tuple(weight.shape), weight.stride(), residual is None,
            tuple(stride), tuple(padding), tuple(dilation), groups, activation,
            torch.backends.cudnn.enabled, torch.backends.cudnn.allow_tf32, _triton_env.interpret())
    found = _MEMO.get(memo)
    if found is None:
        found = (conv_key(x, weight, residual, stride, padding, dilation, groups, activation), candidates(args))
        with _LOCK:
            if len(_MEMO) >= 4096:  # many shapes (varying image sizes): start over
                _MEMO.clear()
            _MEMO[memo] = found
    return found


def _record(key: str, choice: str, how: str) -> str:
    if _USED.get(key, {}).get("choice") != choice:
        with _LOCK:
            _USED[key] = {"choice": choice, "how": how}
    return choice


def used(reset: bool = False) -> Dict[str, dict]:
    """The keys ``backend=None`` resolved since the last reset: the choice, how it was made
    ("measured", "known": from memory or the file, "static": the rule) and, when measured,
    the times per candidate. What the benchmark report prints per conv shape."""
    with _LOCK:
        out = {k: {**_TABLE.get(k, {}), **v} for k, v in _USED.items()}
        if reset:
            _USED.clear()
    return out


@torch.compiler.assume_constant_result
def _constant_choice(key: str, usable: Tuple[str, ...]) -> str:
    """Under torch.compile: a known choice, else the static rule, as a constant of the trace."""
    entry = lookup(key)
    if entry is not None and entry["choice"] in usable:
        return _record(key, entry["choice"], "known")
    return _record(key, static_choice(usable), "static")


def conv_backend(args: Sequence, run: Callable[[str], object]) -> str:
    """The candidate that runs this ``conv_bn_act`` call (validated ``args``), measuring it first
    if it is new; ``run(name)`` computes the call with candidate ``name``."""
    x, weight, _, _, residual, stride, padding, dilation, groups, activation = args
    if torch.compiler.is_compiling():
        key = conv_key(x, weight, residual, stride, padding, dilation, groups, activation)
        return _constant_choice(key, candidates(args))
    if torch.jit.is_tracing():  # shapes are traced values here: the static rule
        return static_choice(candidates(args))
    key, usable = _key_and_candidates(args)
    entry = lookup(key)
    if entry is not None and entry["choice"] in usable:
        return _record(key, entry["choice"], "known")
    if len(usable) == 1 or not autotune_enabled() or _capturing(x.device):
        return _record(key, static_choice(usable), "static")
    with _MEASURE_LOCK:
        entry = lookup(key)  # another thread may have measured it meanwhile
        if entry is None or entry["choice"] not in usable:
            entry = measure(key, usable, run, x.device, lambda: reference.conv_bn_act(*args))
    return _record(key, entry["choice"], "measured")


# ----------------------------------------------------------------------------
# python -m fastres.tune
# ----------------------------------------------------------------------------


def format_table(entries: Dict[str, dict]) -> str:
    """One line per key: the choice and each candidate's steady-state (first-call) ms."""
    if not entries:
        return "(no measured choices)"
    names = backends.tune_names()
    rows = [("key", "choice", *names, "tune ms")]
    for key in sorted(entries):
        e = entries[key]
        cells = []
        for c in names:
            if c in e["ms"]:
                first = e.get("first_ms", {}).get(c)
                cells.append(f"{e['ms'][c]:.4f}" + (f" ({first:.1f})" if first is not None else ""))
            elif c in e.get("disqualified", {}):
                cells.append("disqualified")
            else:
                cells.append("skipped" if c in e.get("skipped", {}) else "-")
        rows.append((key, e["choice"], *cells, f"{e.get('tune_ms', 0.0):.1f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fastres.tune", description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--show", action="store_true",
                       help="the measured choices: per key, the choice and each candidate's steady-state ms "
                            "(first call ms in parentheses)")
    group.add_argument("--clear", action="store_true", help="delete the cache file")
    group.add_argument("--path", action="store_true", help="print the cache file's path")
    args = parser.parse_args(argv)
    path = cache_path()
    if args.path:
        print(path)
    elif args.clear:
        clear()
        print(f"cleared {path}")
    else:
        print(f"cache: {path}")
        print("versions: " + ", ".join(f"{k} {v}" for k, v in versions().items()))
        print("autotune: " + ("on" if autotune_enabled() else "off (FASTRES_AUTOTUNE=0)"))
        print("columns: ms per call, steady state (first call); 'skipped', 'disqualified': the reasons follow")
        table = choices()
        print(format_table(table))
        for key in sorted(table):
            for how in ("disqualified", "skipped"):
                for name, why in table[key].get(how, {}).items():
                    print(f"{how}: {name} for {key}: {why}")
    return 0


