"""The benchmark harness (``python -m benchmarks``), on the CPU, in a few seconds:
the CLI end to end on tiny configurations, the output folder, the report
helpers and targets, the plots, and the case definitions shared with
pytest-benchmark (``benchmarks/test_bench_kernels.py``)."""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # `benchmarks` is not installed: it lives next to `fastres`
    sys.path.insert(0, ROOT)

from benchmarks import __main__ as cli  # noqa: E402
from benchmarks import bench_models, cases, config, plots, report  # noqa: E402
from fastres import _onednn  # noqa: E402
from fastres.shapes import conv_shapes  # noqa: E402

CPU = torch.device("cpu")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROW_KEYS = {"device", "device_type", "torch", "cuda", "triton", "fastres", "fastres_commit", "suite", "provider",
            "dtype", "layout", "batch", "ms", "ms_p20", "ms_p80"}


def _outputs(out):
    return sorted(os.listdir(out))


def _load(out):
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------
# The CLI, end to end.
# ----------------------------------------------------------------------------


def test_cli_models_tiny(tmp_path, capsys):
    out = str(tmp_path / "res")
    rc = cli.main(["--device", "cpu", "--suite", "models", "--arch", "resnet18", "--batch", "1",
                   "--image-size", "64", "--reps", "1", "--no-host-overhead", "--out", out])
    assert rc == 0
    files = _outputs(out)
    assert files == ["report.md", "results.json", "throughput.png"]  # no memory on CPU, no kernels run
    assert len(files) <= 5
    with open(os.path.join(out, "throughput.png"), "rb") as f:
        assert f.read(8) == PNG_MAGIC

    result = _load(out)
    assert result["schema"] == report.SCHEMA
    assert result["command"].startswith("python -m benchmarks --device cpu --suite models")
    assert result["environment"]["device_type"] == "cpu"
    assert result["peaks"]["copy_gbps"] > 0 and result["peaks"]["matmul_tflops"] > 0
    rows = result["rows"]
    expected = {("tv-eager", "nchw", "float32"), ("tv-eager", "channels_last", "float32"),
                ("tv-fx-fuse", "channels_last", "float32"), ("fastres-torch", "channels_last", "float32"),
                ("fastres-torch", "nchw", "float32")}
    expected |= {(p.name, "nchw", "float32") for p in bench_models.engine_providers()}  # ONNX Runtime...
    if bench_models.cpu_bf16():  # no compile rows: torch.compile(freezing) is timed for ResNet-50 only
        expected |= {("tv-eager", "channels_last", "bfloat16"), ("fastres-torch", "channels_last", "bfloat16")}
    assert {(r["provider"], r["layout"], r["dtype"]) for r in rows} == expected
    for r in rows:
        assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
        assert r["suite"] == "models" and r["arch"] == "resnet18" and r["batch"] == 1
        assert r["images_per_s"] > 0 and r["ms_p20"] <= r["ms"] <= r["ms_p80"]
        if r["dtype"] == "float32" and r["provider"] != "openvino":  # (OpenVINO may compute in bf16)
            assert r["rel_l2_err"] < 1e-4, r  # fp32 on the CPU: every provider computes the same logits
        if r["provider"] == "fastres-torch":  # a folded weight per conv and input size (warm-up, timed)
            dtype = getattr(torch, r["dtype"])  # in the dtype oneDNN computes in (fp32 where it has no bf16)
            widen = _onednn.compute_dtype(dtype).itemsize / dtype.itemsize
            assert r["weights_mib"] * widen * 0.9 < r["prepared_mib"] < r["weights_mib"] * widen * 2.1
            # every conv ran a prepared CPU path: oneDNN's fused conv, or, at this small size, the 1x1 matmul or
            # ATen's conv2d on the folded weight (a 16-bit one where oneDNN computes that dtype in fp32)
            paths = dict(p.rsplit(" ", 1) for p in r["conv_paths"].removesuffix(" of 20").split(", "))
            assert set(paths) <= {"onednn", "gemm-1x1", "small-conv", "conv16"}, r
            assert sum(map(int, paths.values())) >= 20, r
    base = next(r for r in rows if r["provider"] == "tv-eager" and r["layout"] == "nchw")
    assert base["speedup_vs_tv_fp32"] == pytest.approx(1.0) and base["max_abs_err"] == 0.0
    assert result["skipped"] == []
    assert any(t["name"].startswith("fastres eval logits") and t["status"] == "met" for t in result["targets"])

    if bench_models.engine_providers():  # fastres timed after an engine as after stock PyTorch
        checked = [r for r in rows if "after_engine_ratio" in r]
        assert [r["provider"] for r in checked] == ["fastres-torch"] * len(checked) and checked
        assert any(t["name"].startswith("timings independent") for t in result["targets"])
    env = result["environment"]
    assert {"cpu_isa", "cpu_capability", "onednn_bf16", "onednn_fp16", "threads"} <= set(env)
    md = open(os.path.join(out, "report.md")).read()
    assert "- CPU ISA: " in md
    for heading in ("# fastres benchmark report", "## Targets", "## Models: eval throughput", "### resnet18",
                    "## Plots", "## Method", "![throughput.png](throughput.png)"):
        assert heading in md
    assert "fastres-torch" in md and result["environment"]["device"] in md
    printed = capsys.readouterr().out
    assert "== Models: eval throughput ==" in printed and "tv-fx-fuse" in printed


def test_cli_kernels_tiny(tmp_path):
    out = str(tmp_path / "res")
    rc = cli.main(["--device", "cpu", "--suite", "ops", "conv", "--arch", "resnet18", "--batch", "1",
                   "--image-size", "32", "--reps", "1", "--rep-ms", "1", "--no-plots", "--out", out])
    assert rc == 0
    assert _outputs(out) == ["report.md", "results.json"]
    rows = _load(out)["rows"]
    assert {r["suite"] for r in rows} == {"ops", "conv"}
    conv = [r for r in rows if r["suite"] == "conv"]
    assert {r["provider"] for r in conv} == {"eager", "folded", "fastres-torch"}
    for r in rows:
        assert ROW_KEYS <= set(r)
        assert r["layout"] == "channels_last" and r["batch"] == 1
        assert r["gbps"] > 0 and r["rel_diff_vs_eager"] < 1e-4
        if r["provider"] == "eager":
            assert r["speedup_vs_eager"] == pytest.approx(1.0)
    assert all(r["tflops"] > 0 and r["gflop"] > 0 for r in conv)
    md = open(os.path.join(out, "report.md")).read()
    assert "## Kernels: conv_bn_act" in md and "## Kernels: elementwise fusions" in md


def test_cli_time_limit_reports_what_was_not_measured(tmp_path):
    out = str(tmp_path / "res")
    rc = cli.main(["--device", "cpu", "--suite", "models", "--arch", "resnet18", "--batch", "1", "--image-size", "32",
                   "--time-limit", "0", "--out", out])
    assert rc == 0
    result = _load(out)
    n_eval = 5 + len(bench_models.engine_providers()) + (2 if bench_models.cpu_bf16() else 0)
    n_host = len(bench_models.host_overhead_providers(torch.device("cpu")))
    assert result["rows"] == [] and len(result["skipped"]) == n_eval + n_host
    assert all(s["reason"] == "time limit reached" for s in result["skipped"])
    assert "## Not measured" in open(os.path.join(out, "report.md")).read()
    assert "throughput.png" not in _outputs(out)


def test_cli_sigterm_writes_partial_results(tmp_path, monkeypatch):
    out = str(tmp_path / "res")
    monkeypatch.setattr(cli, "run_suite", lambda *a, **k: os.kill(os.getpid(), signal.SIGTERM))
    before = signal.getsignal(signal.SIGTERM)
    rc = cli.main(["--device", "cpu", "--suite", "models", "--out", out])
    assert rc == 130
    assert signal.getsignal(signal.SIGTERM) == before
    result = _load(out)
    assert result["interrupted"] == "SIGTERM" and result["rows"] == []
    assert "interrupted" in open(os.path.join(out, "report.md")).read()


def test_report_rerenders_from_json(tmp_path, capsys):
    out = str(tmp_path / "res")
    assert cli.main(["--device", "cpu", "--suite", "models", "--arch", "resnet18", "--batch", "1", "--image-size",
                     "32", "--reps", "1", "--no-host-overhead", "--json-only", "--out", out]) == 0
    assert _outputs(out) == ["results.json"]
    report.main([out])
    assert _outputs(out) == ["report.md", "results.json", "throughput.png"]
    assert "![throughput.png](throughput.png)" in open(os.path.join(out, "report.md")).read()
    assert _load(out)["plots"] == ["throughput.png"]


def test_defaults_quick_and_full():
    quick = config.default_config("cpu", full=False)
    assert quick.suites == ["ops", "conv", "models"] and quick.model_archs[0] == "resnet50"
    assert quick.model_batches == [1, 8] and quick.dtype == "float32" and quick.compile_modes == ["freezing"]
    assert config.compile_modes_for(quick, "resnet50", 1) == ["freezing"]
    assert config.compile_modes_for(quick, "resnet18", 8) == []
    assert quick.host_overhead
    gpu = config.default_config("cuda", full=False)
    assert gpu.suites == list(config.ALL_SUITES) and gpu.dtype == "bfloat16"
    assert config.compile_modes_for(gpu, "resnet50", 128) == ["default"]
    assert config.compile_modes_for(gpu, "resnet18", 128) == []
    full = config.default_config("cuda", full=True)
    assert full.model_archs == list(config.RESNETS)
    assert config.compile_modes_for(full, "resnet50", 1) == ["default", "max-autotune"]
    assert config.compile_modes_for(full, "resnet152", 1) == ["default"]
    args = cli.parse_args(["--suite", "all", "--arch", "resnet34", "--batch", "2", "4", "--no-compile",
                           "--device", "cuda"])
    cfg = cli.build_config(args)
    assert cfg.suites == list(config.ALL_SUITES) and cfg.compile_modes == []
    assert cfg.model_archs == cfg.train_archs == cfg.kernel_archs == ["resnet34"]
    assert cfg.model_batches == cfg.kernel_batches == [2, 4]


# ----------------------------------------------------------------------------
# Case definitions (shared with pytest-benchmark).
# ----------------------------------------------------------------------------


def test_full_cases_cover_every_distinct_conv_and_activation_shape():
    convs = cases.kernel_cases("conv", ["resnet18", "resnet50"], [2], quick=False, device_type="cuda")
    expected = {(s.N, s.C, s.H, s.W, s.K, s.R, s.stride, s.residual) for a in ("resnet18", "resnet50")
                for s in conv_shapes(a, 2)}
    assert {(c.conv.N, c.conv.C, c.conv.H, c.conv.W, c.conv.K, c.conv.R, c.conv.stride, c.residual)
            for c in convs} == expected
    assert len(convs) == len(expected)  # a geometry shared by both models appears once
    ops = cases.kernel_cases("ops", ["resnet50"], [2], quick=False, device_type="cuda")
    outs = {(s.N, s.K, s.P, s.Q) for s in conv_shapes("resnet50", 2)}
    assert {c.shape for c in ops if c.op == "bn_act"} == outs
    assert {c.shape for c in ops if c.op == "add_act"} == {(s.N, s.K, s.P, s.Q) for s in conv_shapes("resnet50", 2)
                                                          if s.residual}
    assert all(c.activation == "identity" for c in convs if "downsample" in c.source)
    assert len({c.id for c in convs + ops}) == len(convs + ops)


def test_quick_cases():
    cpu_conv = cases.kernel_cases("conv", ["resnet50", "resnet18"], [8], quick=True, device_type="cpu")
    assert [c.label for c in cpu_conv] == ["conv 3x3/s1 64->64 56x56", "conv 1x1/s1 64->256 56x56 +res"]
    cpu_ops = cases.kernel_cases("ops", ["resnet50"], [8], quick=True, device_type="cpu")
    assert [c.label for c in cpu_ops] == ["add_act 256x56x56", "bn_act+res 256x56x56"]
    gpu_conv = cases.kernel_cases("conv", ["resnet50"], [64], quick=True, device_type="cuda")
    assert len(gpu_conv) == 8 and all(c.batch == 64 for c in gpu_conv)
    assert "conv 1x1/s1 256->1024 14x14 +res" in [c.label for c in gpu_conv]  # repeated 6 times


def test_case_traffic_and_flops():
    shape = next(s for s in conv_shapes("resnet50", 4) if s.residual)
    conv = next(c for c in cases.cases_of("resnet50", 4) if c.op == "conv_bn_act" and c.residual)
    assert conv.flops == shape.flops
    n = lambda t: t[0] * t[1] * t[2] * t[3]  # noqa: E731
    weight = shape.K * shape.C * shape.R * shape.S
    assert conv.min_bytes(torch.bfloat16) == 2 * (n(conv.shape) + weight + 2 * n(conv.out_shape))
    add = cases.KernelCase("add_act", (2, 3, 4, 5), True, "relu")
    assert add.min_bytes(torch.float32) == 3 * 120 * 4 and add.flops == 0


def test_providers_compute_the_same_function():
    case = next(c for c in cases.cases_of("resnet18", 1, 32) if c.op == "conv_bn_act" and c.residual)
    fns = cases.providers(case, CPU, torch.float32, compile=False)
    assert list(fns) == cases.provider_names(case, CPU, compile=False) == ["eager", "folded", "fastres-torch"]
    with torch.no_grad():
        outs = {name: fn() for name, (fn, _) in fns.items()}
    for name, y in outs.items():
        torch.testing.assert_close(y, outs["eager"], rtol=1e-4, atol=1e-4, msg=name)
        assert y.is_contiguous(memory_format=torch.channels_last)


def test_pytest_benchmark_shares_the_case_definitions():
    pytest.importorskip("pytest_benchmark")
    from benchmarks import test_bench_kernels as tbk

    cfg = config.default_config(tbk.DEVICE.type, full=False)
    expected = [c for s in ("ops", "conv") for c in config.kernel_cases(cfg, s)]
    assert tbk.CASES == expected
    pairs = [tuple(p.values) for p in tbk.PARAMS]
    assert pairs == list(cases.iter_case_providers(expected, tbk.DEVICE, compile=tbk.COMPILE))
    assert len({p.id for p in tbk.PARAMS}) == len(tbk.PARAMS)


# ----------------------------------------------------------------------------
# Report helpers, targets, plots.
# ----------------------------------------------------------------------------


def _model_row(provider, ips, *, arch="resnet50", batch=8, dtype="float32", layout="channels_last", err=1e-7,
               suite="models", mem=None):
    return {"suite": suite, "arch": arch, "batch": batch, "provider": provider, "dtype": dtype, "layout": layout,
            "images_per_s": ips, "ms": 1e3 * batch / ips, "ms_p20": None, "ms_p80": None, "rel_l2_err": err,
            "max_abs_err": err, "peak_mem_mib": mem}


def test_tables_format_missing_values_and_drop_empty_columns():
    rows = [{"case": "add_act 1x2x3", "batch": 1, "provider": "eager", "ms": 0.5, "ms_p20": 0.4, "ms_p80": 0.6,
             "gbps": 10.0, "frac_copy_bw": 0.5, "tflops": None, "speedup_vs_eager": 1.0}]
    text = report.text_table(rows)
    assert "TFLOP/s" not in text and "of matmul peak" not in text  # empty in every row
    assert "0.5000" in text and "50%" in text and "1.00x" in text
    md = report.markdown_table(rows)
    lines = md.splitlines()
    assert lines[0].startswith("| case | N | provider | median ms") and lines[1].startswith("|---|---|---|---:")
    assert len(lines) == 3 and lines[2].count("|") == lines[0].count("|")
    assert report._fmt("{:.2f}")(None) == "-" and report._fmt("{:.2f}")(float("nan")) == "-"


def test_cpu_targets():
    rows = [_model_row("tv-eager", 10.0, layout="nchw"), _model_row("tv-eager", 13.0),
            _model_row("tv-fx-fuse", 14.0), _model_row("fastres-torch", 15.0)]
    targets = report.evaluate_targets({"rows": rows, "environment": {"device_type": "cpu"}})
    status = {t["name"]: t["status"] for t in targets}
    assert status["CPU: ResNet-50 eval, batch 8, fastres vs torchvision eager NCHW"] == "met"  # 1.5x
    assert status["CPU: ResNet-50 eval, batch 8, fastres vs torchvision channels_last + fx fuse"] == "met"
    assert status["fastres eval logits as accurate as torchvision"] == "met"
    rows[-1] = _model_row("fastres-torch", 13.5, err=5e-3)
    targets = report.evaluate_targets({"rows": rows, "environment": {"device_type": "cpu"}})
    status = {t["name"]: t["status"] for t in targets}
    assert status["CPU: ResNet-50 eval, batch 8, fastres vs torchvision eager NCHW"] == "NOT met"  # 1.35x
    assert status["CPU: ResNet-50 eval, batch 8, fastres vs torchvision channels_last + fx fuse"] == "NOT met"
    assert status["fastres eval logits as accurate as torchvision"] == "NOT met"  # 5e-3 > 1e-3 fp32 floor
    rows[0] = {**rows[0], "ms_p20": 700.0, "ms_p80": 1400.0}  # a disturbed baseline
    targets = report.evaluate_targets({"rows": rows, "environment": {"device_type": "cpu"}})
    assert targets[0]["status"].startswith("NOT met (noisy timings, p80/p20 up to 2.00")
    rows = [_model_row("tv-compile-freezing", 12.0, batch=1, dtype="bfloat16"),
             _model_row("tv-eager", 10.0, batch=1, dtype="bfloat16", err=1e-2),
             _model_row("fastres-torch", 12.5, batch=1, dtype="bfloat16", err=1.4e-2),
             {**_model_row("tv-eager", 100.0, batch=1), "image_size": 16},
             {**_model_row("fastres-torch", 95.0, batch=1), "image_size": 16},
             {**_model_row("tv-eager", 100.0, batch=1, dtype="bfloat16"), "image_size": 16},
             {**_model_row("fastres-torch", 101.0, batch=1, dtype="bfloat16"), "image_size": 16},
             {**_model_row("tv-eager", 100.0, batch=1, layout="nchw"), "image_size": 16},
             {**_model_row("fastres-torch", 80.0, batch=1, layout="nchw"), "image_size": 16},
             _model_row("tv-eager", 10.0, batch=1, layout="nchw"), _model_row("fastres-torch", 11.0, batch=1,
                                                                                layout="nchw")]
    status = {t["name"]: t["status"] for t in report.evaluate_targets({"rows": rows, "environment": {"device_type": "cpu"}})}
    assert status["CPU: ResNet-50 eval bfloat16 batch 1, fastres vs torch.compile(freezing)"] == "met"
    assert status["CPU: ResNet-50 eval bfloat16 batch 1, fastres vs torchvision CL eager"] == "met"
    assert status["CPU: ResNet-50 bfloat16 batch 1 logits error vs torchvision's"] == "met"  # 1.4x <= 1.5x
    assert status["CPU: host overhead, ResNet-50 1x3x16x16 float32 CL, fastres vs torchvision CL eager"] \
        == "NOT met"  # 0.95x < 1.0x
    assert status["CPU: host overhead, ResNet-50 1x3x16x16 float32 NCHW, fastres vs torchvision NCHW eager"] \
        == "NOT met"
    assert status["CPU: host overhead, ResNet-50 1x3x16x16 bfloat16 CL, fastres vs torchvision CL eager"] == "met"
    assert status["CPU: ResNet-50 eval float32 NCHW batch 1, fastres vs torchvision NCHW eager"] == "met"
    empty = report.evaluate_targets({"rows": [], "environment": {"device_type": "cpu"}})
    assert [t["status"] for t in empty] == ["not measured", "not measured"]


def test_cpu_train_targets_per_fastres_row():
    rows = [_model_row(p, ips, arch="resnet18", suite="train", dtype=dt)
            for p, ips, dt in (("tv-eager", 20.0, "float32"), ("fastres-torch", 20.5, "float32"),
                               ("fastres-torch-min", 18.0, "float32"), ("tv-eager", 30.0, "bfloat16"),
                               ("fastres-torch", 29.0, "bfloat16"))]
    rows.append(_model_row("tv-eager", 10.0, arch="resnet18", suite="train", layout="nchw"))  # no fastres row
    targets = [t for t in report.evaluate_targets({"rows": rows, "environment": {"device_type": "cpu"}})
               if t["name"].startswith("CPU: train step")]
    assert {t["name"]: t["status"] for t in targets} == {
        "CPU: train step resnet18 batch 8 float32 channels_last, fastres (default memory mode) vs torchvision eager":
            "met",
        'CPU: train step resnet18 batch 8 float32 channels_last, fastres (training_memory="min") vs torchvision '
        "eager": "NOT met",
        "CPU: train step resnet18 batch 8 bfloat16 channels_last, fastres (default memory mode) vs torchvision "
        "eager": "NOT met",
    }


def test_gpu_goals_and_accuracy_scale_with_torchvision():
    rows = [_model_row("tv-eager", 1000.0, dtype="bfloat16", batch=128, err=8e-3),
            _model_row("fastres-triton", 1200.0, dtype="bfloat16", batch=128, err=1.5e-2),
            _model_row("tv-compile", 1300.0, dtype="bfloat16", batch=128, err=8e-3),
            _model_row("fastres-compile", 1250.0, dtype="bfloat16", batch=128, err=1e-2)]
    targets = {t["name"]: t for t in report.evaluate_targets({"rows": rows, "environment": {"device_type": "cuda"}})}
    assert targets["GPU: ResNet-50 eval, fastres eager (best backend) vs tv-eager"]["status"] == "met"
    assert targets["GPU: ResNet-50 eval, fastres-compile vs tv-compile"]["status"] == "NOT met"
    assert targets["GPU: ResNet-50 eval, fastres-cudagraph vs tv-cudagraph"]["status"] == "not measured"
    assert targets["fastres eval logits as accurate as torchvision"]["status"] == "met"  # 1.5e-2 <= 2 x 8e-3


def test_plots(tmp_path):
    rows = [_model_row(p, ips * b, batch=b, mem=100.0 * b) for b in (1, 8, 32)
            for p, ips in (("tv-eager", 10.0), ("fastres-triton", 12.0))]
    rows += [{"suite": "conv", "op": "conv_bn_act", "case": "conv 3x3", "batch": 8, "provider": p,
              "speedup_vs_eager": s} for p, s in (("eager", 1.0), ("cudnn-fused", 1.3), ("fastres-triton", 1.5))]
    out = str(tmp_path)
    open(os.path.join(out, "memory.png"), "w").close()
    assert plots.write_plots({"rows": rows}, out) == ["throughput.png", "kernels.png", "memory.png"]
    for name in ("throughput.png", "kernels.png", "memory.png"):
        with open(os.path.join(out, name), "rb") as f:
            assert f.read(8) == PNG_MAGIC
    assert plots.write_plots({"rows": rows[:2]}, out) == ["throughput.png", "memory.png"]  # single batch: bars
    assert not os.path.exists(os.path.join(out, "kernels.png"))  # a stale plot is removed


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="onnxruntime not installed")
def test_onnxruntime_sessions_do_not_spin():
    """ONNX Runtime's threads spin after each run by default, slowing whatever is timed next: the
    benchmark's sessions turn spinning off and use PyTorch's thread count."""
    options = bench_models.onnxruntime_options()
    for key in ("session.intra_op.allow_spinning", "session.inter_op.allow_spinning"):
        assert options.get_session_config_entry(key) == "0"
    assert options.intra_op_num_threads == torch.get_num_threads() and options.inter_op_num_threads == 1


def test_order_check_and_isolation_target():
    """order_check times a provider after each stock provider and after each engine; the report's
    isolation gate fails beyond the tolerance."""
    from benchmarks import timing

    calls = []
    check = timing.order_check(lambda: calls.append("fn"), [lambda: calls.append("engine")],
                               [lambda: calls.append("tv"), lambda: calls.append("tv-cl")], min_reps=3)
    assert calls == ["tv", "fn", "tv-cl", "fn", "engine", "fn"] * 3 and check["ratio"] > 0
    rows = [{**_model_row("fastres-torch", 10.0), "after_engine_ratio": r, "image_size": 224} for r in (1.02, 0.97)]
    target = report._isolation_target(rows)
    assert target["status"] == "met" and target["source"] == "benchmark gate"
    rows[1]["after_engine_ratio"] = 1.4
    assert report._isolation_target(rows)["status"] == "NOT met"
    assert report._isolation_target([_model_row("tv-eager", 1.0)]) is None


def test_throughput_plot_has_a_panel_per_image_size(tmp_path, monkeypatch):
    """16x16 host-overhead rows and 224x224 rows never share a line."""
    rows = [{**_model_row(p, 10.0 * b, batch=b), "image_size": size} for b in (1, 8) for size in (16, 224)
            for p in ("tv-eager", "fastres-torch")]
    plt = plots._plt()
    shapes = []
    real = plt.subplots
    monkeypatch.setattr(plt, "subplots", lambda *a, **k: shapes.append(a) or real(*a, **k))
    assert plots.write_plots({"rows": rows}, str(tmp_path)) == ["throughput.png"]
    assert shapes == [(1, 2)]


def test_report_says_which_backend_ran_each_conv_shape():
    """A backend=None model row carries fastres.tune's per-shape choices; the report prints them."""
    from benchmarks import bench_models

    used = {
        "H200|bf16|nhwc|c64h56w56-k64r3s3-s1,1-p1,1-d1,1-g1|n64|relu": {
            "choice": "cudnn", "how": "measured", "ms": {"cudnn": 0.05, "stock": 0.08, "triton": 0.07},
            "first_ms": {"cudnn": 3.0, "stock": 2.0, "triton": 900.0}, "tune_ms": 1300.0},
        "H200|bf16|nhwc|c64h56w56-k256r1s1-s1,1-p0,0-d1,1-g1|n64|relu+res": {"choice": "cuda", "how": "static"},
    }
    fields = bench_models._tune_summary(used)
    assert fields["conv_backends"] == "cuda:1 cudnn:1" and fields["tune_s"] == pytest.approx(1.3)
    row = {**_model_row("fastres-auto", 100.0), **fields, "first_call_s": 2.5}
    md = report.markdown_report({"rows": [row]})
    assert "## Per-shape backend choice" in md and "cuda:1 cudnn:1, tuning 1.3 s of a 2.5 s first call" in md
    assert "| bf16|nhwc|c64h56w56-k64r3s3-s1,1-p1,1-d1,1-g1|n64|relu | cudnn | measured | - | 0.0700 (900.0) | " \
           "0.0500 (3.0) | 0.0800 (2.0) | 1300 |" in md
    assert "| cuda | static | - | - | - | - | - |" in md
    assert "conv backends" in report.text_table([row], report.MODEL_COLUMNS)
    assert bench_models._tune_summary({}) == {}
