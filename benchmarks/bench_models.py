"""The model suites: whole-network eval throughput (``models``) and one training
step (``train``), torchvision against fastres, with peak memory and the
logits' error against torchvision fp32.

Every (arch, batch) starts from one torchvision model with seeded random
weights and random BN statistics and affine parameters (so that folding BN is
really exercised; pretrained weights are not needed to measure speed or error).
Each provider gets its own copy of it (fastres: ``fastres.convert`` of it), so
all rows compute the same function on the same input, and the reference is
torchvision fp32 NCHW on the same device with TF32 off.

Eval providers (:func:`eval_providers`):

===========================  ===================================================
``tv-eager``                 torchvision eager (fp32 NCHW; the 16-bit dtypes channels_last)
``tv-fx-fuse``               (CPU) torchvision with BN folded into the convs by
                             ``torch.fx.experimental.optimization.fuse``, channels_last
``tv-cudagraph``             (GPU) torchvision eager captured in one CUDA graph
``tv-compile``               ``torch.compile(model)`` (mode default)
``tv-compile-max-autotune``  ``torch.compile(model, mode="max-autotune")`` (it uses CUDA graphs)
``tv-compile-freezing``      (CPU) ``torch.compile(model, options={"freezing": True})``: inductor
                             folds BN and prepacks oneDNN weights (fp32, and bf16 where oneDNN has it)
``onnxruntime``              (CPU, when onnx and onnxruntime are installed) the torchvision model
                             exported to ONNX, in an ONNX Runtime CPU session (fp32, NCHW)
``openvino``                 (CPU, when openvino is installed) the torchvision model converted by
                             OpenVINO and compiled for its CPU plugin (fp32 model; OpenVINO's default
                             inference precision, bf16 where the CPU has it)
``fastres-<backend>``        ``fastres.convert(model, backend=...)`` for each usable backend
``fastres-auto``             (GPU) ``fastres.convert(model)``: ``backend=None``, the per-shape choice of
                             ``fastres.tune`` (the row says which backends ran, and the tuning time)
``fastres-cudagraph``        (GPU) fastres, per-shape choice, in one CUDA graph
``fastres-compile``          ``torch.compile`` of fastres, per-shape choice (GPU), best backend (CPU)
===========================  ===================================================

Timing: the first call (compile time for compiled providers, capture for
CUDA graphs) is timed on its own and reported as ``first_call_s``; then, on a
GPU, :func:`benchmarks.timing.time_iterations` per provider (warm-up, trials
of back-to-back iterations between CUDA events, median/p20/p80); on a CPU,
:func:`benchmarks.timing.bench_interleaved` over all providers of the case
(rounds of one call each, so that other processes' load hits all alike). Peak memory is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` at the
start of the timed trials (so it counts weights, input, activations and, in
training, gradients and optimizer state); previous cases are freed first.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import gc
import importlib.util
import io
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.saved import saved_bytes
from benchmarks.timing import bench_interleaved, order_check, synchronize, time_iterations
from fastres import tune

MiB = 2 ** 20
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


@dataclass(frozen=True)
class ModelProvider:
    name: str  # tv-eager, tv-fx-fuse, tv-cudagraph, tv-compile[-max-autotune], fastres-<b>[-min], fastres-cudagraph, fastres-compile
    dtype: torch.dtype
    layout: str  # "nchw" or "channels_last"
    backend: Optional[str] = None  # the fastres backend (None for torchvision)
    amp: bool = False  # training: autocast to dtype with fp32 weights
    training_memory: str = "low"  # fastres.set_training_memory mode (fastres training rows)

    @property
    def fastres(self) -> bool:
        return self.name.startswith("fastres")

    @property
    def compile_mode(self) -> Optional[str]:
        if not self.name.endswith("compile") and "compile-" not in self.name:
            return None
        return self.name.split("compile", 1)[1].lstrip("-") or "default"

    @property
    def cudagraph(self) -> bool:
        return self.name.endswith("cudagraph")

    @property
    def key(self) -> str:
        return f"{self.name} {DTYPE_NAMES[self.dtype]} {self.layout}"


def eval_backends(device: torch.device) -> List[str]:
    """fastres backends that can run a whole eval model here (they must implement conv_bn_act)."""
    from fastres import backends, ops

    return backends.usable_backends(device, backends.implemented_backends("conv_bn_act"))


def train_backends(device: torch.device) -> List[str]:
    """fastres backends for training (batch-statistics BN runs F.conv2d, then bn_act)."""
    from fastres import backends, ops

    return backends.usable_backends(device, backends.implemented_backends("bn_act"))


def _other16(dtype: torch.dtype) -> Optional[torch.dtype]:
    return {torch.bfloat16: torch.float16, torch.float16: torch.bfloat16}.get(dtype)


def eval_providers(device: torch.device, dtype: torch.dtype, *, compile_modes: Sequence[str] = ("default",),
                   full: bool = False) -> List[ModelProvider]:
    """Eval providers, baselines first. ``dtype``: the main low-precision dtype (GPU)."""
    cl, f32 = "channels_last", torch.float32
    if device.type != "cuda":
        out = [ModelProvider("tv-eager", f32, "nchw"), ModelProvider("tv-eager", f32, cl),
               ModelProvider("tv-fx-fuse", f32, cl), *engine_providers()]
        out += [ModelProvider(f"fastres-{b}", f32, cl, b) for b in eval_backends(device)]
        # torchvision's default input: an NCHW tensor to an NCHW model, against tv-eager NCHW
        out += [ModelProvider(f"fastres-{b}", f32, "nchw", b) for b in eval_backends(device)]
        out += [ModelProvider(_compile_name(m), f32, cl) for m in compile_modes]
        if "default" in compile_modes:
            out.append(ModelProvider("fastres-compile", f32, cl, eval_backends(device)[0]))
        if cpu_bf16():  # bf16 (natively where oneDNN has it: AVX512-BF16/AMX), against the same baselines
            bf16 = torch.bfloat16
            out += [ModelProvider("tv-eager", bf16, cl)]
            out += [ModelProvider(f"fastres-{b}", bf16, cl, b) for b in eval_backends(device)]
            out += [ModelProvider(_compile_name(m), bf16, cl) for m in compile_modes if m != "default"]
        return out
    # Most telling first, so that a --time-limit cuts the least important rows.
    # backend None: the per-shape choice of fastres.tune (measured by fastres-auto, the first fastres
    # provider; the CUDA-graph and compiled providers, which never measure, then use those choices).
    best = None
    out = [ModelProvider("tv-eager", f32, "nchw"), ModelProvider("tv-eager", dtype, cl)]
    out += [ModelProvider("fastres-auto", dtype, cl, None)]
    out += [ModelProvider(f"fastres-{b}", dtype, cl, b) for b in eval_backends(device)]
    out += [ModelProvider("tv-cudagraph", dtype, cl), ModelProvider("fastres-cudagraph", dtype, cl, best)]
    out += [ModelProvider(_compile_name(m), dtype, cl) for m in compile_modes]
    if "default" in compile_modes:
        out.append(ModelProvider("fastres-compile", dtype, cl, best))
    other = _other16(dtype)
    if other is not None:
        out.append(ModelProvider("tv-eager", other, cl))
        if full:
            out.append(ModelProvider("fastres-auto", other, cl, best))
    return out


ENGINES = {"onnxruntime": ("onnx", "onnxruntime"), "openvino": ("openvino",)}


def engine_providers() -> List[ModelProvider]:
    """Rows of the other CPU inference engines that are installed (optional, never required):
    ONNX Runtime and OpenVINO, each running the torchvision model (fp32 weights, NCHW input)."""
    return [ModelProvider(name, torch.float32, "nchw") for name, packages in ENGINES.items()
            if all(importlib.util.find_spec(pkg) is not None for pkg in packages)]


def _compile_name(mode: str) -> str:
    return "tv-compile" if mode == "default" else f"tv-compile-{mode}"


def cpu_bf16() -> bool:
    """Whether fastres's oneDNN path takes bf16 on this CPU (natively, or in fp32 where oneDNN has
    no bf16: there torchvision's bf16 runs ATen's slower fallback kernels, and the report shows
    both), else bf16 rows are left out."""
    from fastres import _onednn

    return _onednn.compute_dtype(torch.bfloat16) is not None


def host_overhead_providers(device: torch.device) -> List[ModelProvider]:
    """The host-overhead case (CPU, ResNet-50 at 1x3x16x16): torchvision eager and fastres,
    channels_last in fp32 (and bf16) and NCHW in fp32, where the arithmetic is negligible."""
    cases = [(torch.float32, "channels_last"), (torch.float32, "nchw")]
    cases += [(torch.bfloat16, "channels_last")] if cpu_bf16() else []
    return [ModelProvider(name, dt, layout, backend) for dt, layout in cases
            for name, backend in (("tv-eager", None), *((f"fastres-{b}", b) for b in eval_backends(device)))]


def train_providers(device: torch.device, dtype: torch.dtype) -> List[ModelProvider]:
    """Training providers: torchvision eager and fastres in the same dtype and layout
    (autocast to ``dtype``, fp32 weights; channels_last, and on the CPU also NCHW),
    fastres also with ``training_memory="min"`` (``fastres-<backend>-min``), and
    ``torch.compile`` of torchvision (``tv-compile``, channels_last: its partitioner
    recomputes cheap ops in the backward, the baseline for the saved bytes)."""
    cl = "channels_last"
    amp = dtype != torch.float32
    providers = []
    for layout in (cl,) if device.type == "cuda" else ("nchw", cl):
        providers += [ModelProvider("tv-eager", dtype, layout, amp=amp),
                      *(ModelProvider(f"fastres-{b}", dtype, layout, b, amp=amp) for b in train_backends(device)),
                      *(ModelProvider(f"fastres-{b}-min", dtype, layout, b, amp=amp, training_memory="min")
                        for b in train_backends(device))]
    return providers + [ModelProvider("tv-compile", dtype, cl, amp=amp)]


# ----------------------------------------------------------------------------
# Models.
# ----------------------------------------------------------------------------


def make_torchvision(arch: str, seed: int = 0) -> nn.Module:
    """torchvision's ``arch`` on the CPU in fp32, eval mode, seeded random weights,
    with random BN statistics and affine parameters."""
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, weights=None)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.0, generator=gen)
                m.bias.normal_(0, 0.1, generator=gen)
                m.running_mean.normal_(0, 0.1, generator=gen)
                m.running_var.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def _prepare(p: ModelProvider, base: nn.Module, device: torch.device, train: bool) -> nn.Module:
    import fastres

    if p.fastres:
        model = fastres.set_training_memory(fastres.convert(base, backend=p.backend, warn=False), p.training_memory)
    elif p.name == "tv-fx-fuse":
        from torch.fx.experimental.optimization import fuse

        model = fuse(copy.deepcopy(base).eval())
    else:
        model = copy.deepcopy(base)
    model = model.to(device=device, dtype=torch.float32 if p.amp else p.dtype)
    if p.layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    return model.train(train)


def _input(x: torch.Tensor, p: ModelProvider) -> torch.Tensor:
    x = x.to(torch.float32 if p.amp else p.dtype)
    return x.contiguous(memory_format=torch.channels_last if p.layout == "channels_last" else torch.contiguous_format)


def _cuda_graph(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor):
    """``fn(x)`` captured in a CUDA graph (warm-up on a side stream first, so that
    caches fill and Triton autotunes before capture); returns (replay fn, graph)."""
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = fn(static_x)

    def replay():
        graph.replay()
        return static_y

    return replay, graph


class _NoTF32:
    """TF32 off for an exact fp32 reference."""

    def __enter__(self):
        self.saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def reference_logits(base: nn.Module, x: torch.Tensor, train: bool = False) -> torch.Tensor:
    """torchvision fp32 NCHW on ``x``'s device, TF32 off (train: batch-statistics BN)."""
    model = copy.deepcopy(base).to(x.device).train(train)
    with _NoTF32(), torch.no_grad():
        y = model(x.float().contiguous()).float()
    del model
    return y


def logits_error(y: torch.Tensor, ref: torch.Tensor) -> Dict[str, float]:
    d = y.float() - ref
    return {"max_abs_err": d.abs().max().item(),
            "rel_l2_err": (d.norm() / ref.norm().clamp_min(1e-30)).item()}


def _cleanup(device: torch.device, compiled: bool) -> None:
    if compiled:
        torch._dynamo.reset()  # frees compiled graphs (and their CUDA graph pools)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _skip_reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}"[:300]


# ----------------------------------------------------------------------------
# Runners.
# ----------------------------------------------------------------------------


@dataclass
class _Prepared:
    fn: Callable[[], object]  # one iteration (forward or training step)
    first_s: float  # the first call: compilation, capture, autotuning
    logits: torch.Tensor  # the first call's logits, fp32
    keep: tuple = ()  # objects the fn needs alive (model, graph, optimizer)
    extra: Optional[dict] = None  # more columns for the row (weights_mib, prepared_mib)
    saved_bytes: Optional[int] = None  # training: bytes saved for backward by the first step's forward


def onnxruntime_options():
    """ONNX Runtime session options that leave the cores alone between calls: its intra-op
    threads spin after each run by default, taking the cores from whatever runs next (here,
    the next provider's timing); the same thread count as PyTorch's."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


# OpenVINO's CPU plugin: one inference at a time on PyTorch's threads (INFERENCE_NUM_THREADS,
# set per call), not pinned to cores, so that it leaves the cores as PyTorch's providers do.
OPENVINO_CONFIG = {"PERFORMANCE_HINT": "LATENCY", "ENABLE_CPU_PINNING": False}


def _setup_engine(p: ModelProvider, base: nn.Module, x: torch.Tensor) -> _Prepared:
    """An ONNX Runtime or OpenVINO CPU model of the torchvision model; ``first_call_s`` is the
    export/conversion, the engine's compilation and the first call."""
    model = copy.deepcopy(base).eval().float()
    xin = _input(x, p)
    t0 = time.perf_counter()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer notes
        if p.name == "onnxruntime":
            import onnxruntime

            buf = io.BytesIO()
            torch.onnx.export(model, (xin,), buf, input_names=["x"], output_names=["logits"], dynamo=False)
            session = onnxruntime.InferenceSession(buf.getvalue(), onnxruntime_options(),
                                                   providers=["CPUExecutionProvider"])
            feed = {"x": xin.numpy()}

            def forward():
                return session.run(None, feed)[0]
        else:
            import openvino

            compiled = openvino.compile_model(openvino.convert_model(model, example_input=xin), "CPU",
                                              OPENVINO_CONFIG | {"INFERENCE_NUM_THREADS": torch.get_num_threads()})
            array = xin.numpy()

            def forward():
                return compiled(array)[0]

        y = torch.from_numpy(forward()).float().clone()
    first_s = time.perf_counter() - t0
    weights = sum(t.numel() * t.element_size() for t in model.parameters()) / MiB
    return _Prepared(forward, first_s, y, (model, xin), {"weights_mib": weights})


# The image size every eager CPU model runs once before the timed one (see _setup_eval).
OTHER_SIZE = 16


def _setup_eval(p: ModelProvider, base: nn.Module, x: torch.Tensor, labels, device: torch.device) -> _Prepared:
    if p.name in ENGINES:
        return _setup_engine(p, base, x)
    model = _prepare(p, base, device, train=False)
    xin = _input(x, p)
    with torch.no_grad():
        fwd, graph = model, None
        if p.compile_mode is not None:
            torch._dynamo.reset()
            if p.compile_mode == "freezing":  # inductor's CPU path: BN folded, oneDNN weights prepacked
                fwd = torch.compile(model, dynamic=False, options={"freezing": True})
            else:
                fwd = torch.compile(model, mode=None if p.compile_mode == "default" else p.compile_mode,
                                    dynamic=False)
        if device.type == "cpu" and p.compile_mode is None:
            # serving code warms up on small inputs: every eager row is timed after another size ran
            fwd(_input(torch.randn(1, 3, OTHER_SIZE, OTHER_SIZE), p))
        t0 = time.perf_counter()
        if p.cudagraph:
            replay, graph = _cuda_graph(model, xin)
            y = replay()
        else:
            y = fwd(xin)
        synchronize(device)
        first_s = time.perf_counter() - t0
    y = y.detach().float().clone()

    def forward():
        with torch.no_grad():
            return replay() if graph is not None else fwd(xin)

    extra = {"weights_mib": sum(t.numel() * t.element_size() for t in model.parameters()) / MiB}
    if p.fastres:  # what fastres prepared from the weights (folded, prepacked...), resident with them
        import fastres

        units = list(fastres.nn.modules.fused_modules(model))
        extra["prepared_mib"] = sum(m._fastres_cache.nbytes() for m in units) / MiB
        if device.type == "cpu":  # which CPU paths the convs ran (a prepared form per conv and path that ran)
            paths = collections.Counter(kind for m in units for (_, kind) in m._fastres_cache._entries
                                        if kind not in ("scale_shift", "weight"))
            convs = sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))
            extra["conv_paths"] = ", ".join(f"{kind} {n}" for kind, n in sorted(paths.items())) + f" of {convs}"
    return _Prepared(forward, first_s, y, (model, fwd, graph, xin), extra)


def _setup_train(p: ModelProvider, base: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                 device: torch.device) -> _Prepared:
    model = _prepare(p, base, device, train=True)
    xin = _input(x, p)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    fwd = model
    if p.compile_mode is not None:
        torch._dynamo.reset()
        fwd = torch.compile(model, mode=None if p.compile_mode == "default" else p.compile_mode, dynamic=False)
    first_logits, saved = [], []

    def step():
        with torch.autocast(device.type, dtype=p.dtype) if p.amp else contextlib.nullcontext():
            if not first_logits:  # the first step also counts what its forward saves for backward
                nbytes, out = saved_bytes(fwd, xin)
                saved.append(nbytes)
            else:
                out = fwd(xin)
            loss = F.cross_entropy(out.float(), labels)
        if not first_logits:
            first_logits.append(out.detach().float().clone())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t0 = time.perf_counter()
    step()
    synchronize(device)
    return _Prepared(step, time.perf_counter() - t0, first_logits[0], (model, fwd, opt, xin),
                     saved_bytes=saved[0])


def _tune_summary(used: Dict[str, dict]) -> dict:
    """Row fields for a ``backend=None`` provider: which backend ran each conv shape (``fastres.tune.used()``)."""
    if not used:
        return {}
    counts: Dict[str, int] = {}
    for e in used.values():
        counts[e["choice"]] = counts.get(e["choice"], 0) + 1
    return {"conv_backends": " ".join(f"{b}:{n}" for b, n in sorted(counts.items())),
            "tune_s": sum(e.get("tune_ms", 0.0) for e in used.values() if e["how"] == "measured") / 1e3,
            "conv_choices": used}


def _run(suite: str, archs: Sequence[str], batches: Sequence[int], device: torch.device, providers_for,
         setup, *, image_size: int, trials: int, trial_ms: float, progress, budget,
         skipped: Optional[List[dict]]) -> List[dict]:
    """Rows for every (arch, batch, provider) of one model suite.

    GPU: one provider at a time (built, first call, warm-up, timed trials, peak
    memory, freed). CPU: every provider of an (arch, batch) is built first, then
    they are timed in interleaved rounds (:func:`benchmarks.timing.bench_interleaved`).
    """
    train = suite == "train"
    rows: List[dict] = []
    for arch in archs:
        base = make_torchvision(arch)
        for batch in batches:
            provs = providers_for(arch, batch)
            gen = torch.Generator().manual_seed(batch)
            x = torch.randn(batch, 3, image_size, image_size, generator=gen).to(device)
            labels = torch.randint(0, 1000, (batch,), generator=gen).to(device)
            ref = None
            measured: List[Tuple[ModelProvider, dict, torch.Tensor]] = []
            prepared: Dict[ModelProvider, _Prepared] = {}

            def common(p):
                row = {"suite": suite, "arch": arch, "batch": batch, "image_size": image_size, "provider": p.name,
                       "backend": p.backend, "dtype": DTYPE_NAMES[p.dtype], "layout": p.layout}
                if train:
                    row.update({"amp": p.amp, "optimizer": "SGD(momentum=0.9)"})
                else:
                    row["compile_mode"] = p.compile_mode
                return row

            def skip(p, reason):
                if skipped is not None:
                    skipped.append({**common(p), "reason": reason})

            for p in provs:
                if progress is not None:
                    progress.set_postfix_str(f"{arch} N={batch} {p.key}", refresh=False)
                if budget is not None and budget.exhausted():
                    skip(p, "time limit reached")
                    if progress is not None:
                        progress.update(1)
                    continue
                try:
                    if ref is None:
                        ref = reference_logits(base, x, train=train)
                    tune.used(reset=True)
                    prep = setup(p, base, x, labels, device)
                    choices = _tune_summary(tune.used()) if p.fastres and p.backend is None else {}
                    if device.type != "cuda":
                        prepared[p] = prep
                        continue
                    torch.cuda.reset_peak_memory_stats(device)
                    t = time_iterations(prep.fn, device, trials=trials, trial_ms=trial_ms, warmup=2)
                    t["peak_mem_mib"] = torch.cuda.max_memory_allocated(device) / MiB
                    measured.append((p, {**t, **_saved(prep), "first_call_s": prep.first_s, **(prep.extra or {}),
                                         **choices}, prep.logits))
                except Exception as e:  # noqa: BLE001 - a provider failing (OOM, no backend) is reported
                    skip(p, _skip_reason(e))
                prep = None
                if device.type == "cuda":
                    _cleanup(device, p.compile_mode is not None)
                if progress is not None:
                    progress.update(1)
            if prepared:
                stats = bench_interleaved({p.key: v.fn for p, v in prepared.items()}, warmup=1, min_reps=trials)
                engines = [v.fn for p, v in prepared.items() if p.name in ENGINES]
                stock = [v.fn for p, v in prepared.items() if not p.fastres and p.name not in ENGINES]
                control = next((p for p in prepared if p.fastres), None)
                if engines and stock and control is not None:  # does a timing depend on an engine before it?
                    check = order_check(prepared[control].fn, engines, stock, min_reps=trials)
                    stats[control.key]["after_engine_ratio"] = check["ratio"]
                for p, v in prepared.items():
                    measured.append((p, {**stats[p.key], **_saved(v), "first_call_s": v.first_s, **(v.extra or {})},
                                     v.logits))
                    if progress is not None:
                        progress.update(1)
                prepared.clear()
            case_rows = [{**common(p), **t, "images_per_s": batch / (t["ms"] * 1e-3), **logits_error(y, ref)}
                         for p, t, y in measured]
            _add_speedups(case_rows)
            rows += case_rows
            del x, labels, ref, measured
            _cleanup(device, any(p.compile_mode for p in provs))
    return rows


def _saved(prep: _Prepared) -> Dict[str, float]:
    return {} if prep.saved_bytes is None else {"saved_mib": prep.saved_bytes / MiB}


def run_eval(archs: Sequence[str], batches: Sequence[int], device: torch.device, providers_for, *,
             image_size: int = 224, trials: int = 5, trial_ms: float = 200.0, progress=None, budget=None,
             skipped: Optional[List[dict]] = None) -> List[dict]:
    """Eval rows for every (arch, batch, provider); ``providers_for(arch, batch)`` lists the providers."""
    return _run("models", archs, batches, device, providers_for, _setup_eval, image_size=image_size,
                trials=trials, trial_ms=trial_ms, progress=progress, budget=budget, skipped=skipped)


def run_train(archs: Sequence[str], batches: Sequence[int], device: torch.device, provs: Sequence[ModelProvider], *,
              image_size: int = 224, trials: int = 5, trial_ms: float = 200.0, progress=None, budget=None,
              skipped: Optional[List[dict]] = None) -> List[dict]:
    """One optimizer step (forward, cross-entropy, backward, SGD with momentum) per
    (arch, batch, provider); the error is that of the first step's logits against
    torchvision fp32 in train mode (batch-statistics BN) on the same input."""
    return _run("train", archs, batches, device, lambda a, b: list(provs), _setup_train, image_size=image_size,
                trials=trials, trial_ms=trial_ms, progress=progress, budget=budget, skipped=skipped)


def _add_speedups(rows: List[dict]) -> None:
    """``speedup_vs_tv_fp32`` (vs torchvision eager fp32 NCHW) and ``speedup_vs_tv_same``
    (vs torchvision eager in the row's dtype, channels_last) for the rows of one (arch, batch)."""
    def find(dtype, layout):
        return next((r["ms"] for r in rows if r["provider"] == "tv-eager" and r["dtype"] == dtype
                     and r["layout"] == layout), None)

    fp32 = find("float32", "nchw")
    for r in rows:
        same = find(r["dtype"], r["layout"]) or find(r["dtype"], "channels_last")
        r["speedup_vs_tv_fp32"] = fp32 / r["ms"] if fp32 else None
        r["speedup_vs_tv_same"] = same / r["ms"] if same else None
    # Training: saved-for-backward bytes against torchvision eager and torch.compile, same dtype and layout.
    for base, col in (("tv-eager", "saved_vs_tv"), ("tv-compile", "saved_vs_tv_compile")):
        for r in rows:
            ref = next((b.get("saved_mib") for b in rows if b["provider"] == base and b["dtype"] == r["dtype"]
                        and b["layout"] == r["layout"]), None)
            if r.get("saved_mib") is not None and ref:
                r[col] = r["saved_mib"] / ref
