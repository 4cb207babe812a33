"""`deploy bench`: trtexec's statistics on hand-computed values, the run loop, the report, --json and --compare."""

from __future__ import annotations

import json

import numpy as np
import pytest

from edgedeploy.benchmarks.bench import (
    BenchConfig,
    Stats,
    run_benchmark,
    trt_median,
    trt_percentile,
)
from edgedeploy.cli import main
from edgedeploy.errors import EdgeDeployError
from edgedeploy.runtime import load_engine
from edgedeploy.runtime.engine import Engine, TensorSpec, Timing
from test_runtime_models import make_classifier_onnx


def test_percentile_follows_trtexec_float32_formula():
    ten = [float(i) for i in range(1, 11)]
    # exclude = int((1 - P/100) * N) in float32: (1 - 0.9f) * 10 = 1.0000002 -> 1 -> sorted[8]
    assert trt_percentile(ten, 90) == 9.0
    assert trt_percentile(ten, 95) == 10.0  # int(0.5) = 0 -> last
    assert trt_percentile(ten, 50) == 5.0  # int(5.0) = 5 -> sorted[4]
    assert trt_percentile(ten, 0) == 1.0  # clamps at index 0
    hundred = [float(i) for i in range(1, 101)]
    assert trt_percentile(hundred, 90) == 90.0
    assert trt_percentile(hundred, 99) == 100.0  # (1 - 0.99f) * 100 = 0.99999905 -> 0 -> last
    assert trt_percentile([], 90) == float("inf")
    with pytest.raises(ValueError):
        trt_percentile(ten, 101)


def test_median_averages_middle_pair_for_even_n():
    assert trt_median([1.0, 2.0, 4.0, 10.0]) == 3.0
    assert trt_median([1.0, 2.0, 4.0]) == 2.0


def test_stats_of_hand_values():
    s = Stats.of([4.0, 1.0, 3.0, 2.0])
    assert (s.min, s.max, s.mean, s.median, s.n) == (1.0, 4.0, 2.5, 2.5, 4)
    # population std of 1..4 = sqrt(1.25); CoV = 100 * 1.118 / 2.5
    assert s.cov_percent == pytest.approx(100 * np.sqrt(1.25) / 2.5)
    assert s.percentiles == {90.0: 4.0, 95.0: 4.0, 99.0: 4.0}


class ScriptedEngine(Engine):
    """An engine whose per-call timing split is scripted, to check how the report combines it."""

    backend, device = "scripted", "cuda"

    def __init__(self, timings):
        super().__init__()
        self.inputs = [TensorSpec("x", (-1, 3), np.dtype(np.float32))]
        self.outputs = [TensorSpec("y", (-1, 3), np.dtype(np.float32))]
        self.timings, self.calls = timings, 0

    def _infer(self, feed):
        self.last_timing = self.timings[self.calls % len(self.timings)]
        self.calls += 1
        return {"y": feed["x"] * 2}


def test_latency_is_h2d_plus_compute_plus_d2h_and_warnings_fire():
    t = [Timing(enqueue_ms=2.0, h2d_ms=0.5, compute_ms=1.0 + 0.1 * (i % 2), d2h_ms=1.5, latency_ms=99.0)
         for i in range(4)]
    rep = run_benchmark(ScriptedEngine(t), BenchConfig(batch=4, warmup_ms=0, iterations=20), progress=False)
    assert rep.queries == 20 and rep.batch == 4
    assert rep.latency.min == pytest.approx(3.0) and rep.latency.max == pytest.approx(3.1)
    assert rep.latency.median == pytest.approx(3.05)  # 10 of each: even N averages 3.0 and 3.1
    assert rep.images_per_s == pytest.approx(4 * rep.qps) and rep.qps == pytest.approx(20 / rep.walltime_s)
    text = "\n".join(rep.warnings)
    assert "bound by Enqueue Time" in text  # enqueue 2.0 > compute 1.05
    assert "device-to-host" in text  # D2H 1.5 >= compute
    assert "host-to-device" not in text  # H2D 0.5 < compute
    assert "unstable, with coefficient of variance = 4.7" in text  # 0.05 / 1.05
    out = rep.format()
    assert "Timing trace has 20 queries" in out and "GPU Compute Time: min = 1 ms" in out
    assert json.loads(json.dumps(rep.to_dict()))["latency_ms"]["percentiles"]["p99"] == pytest.approx(3.1)


def test_run_benchmark_on_onnxruntime_batch_and_duration(tmp_path):
    path, _ = make_classifier_onnx(tmp_path)
    with load_engine(path) as eng:
        rep = run_benchmark(eng, BenchConfig(batch=3, warmup_ms=20, duration_s=0.2), progress=False)
        assert rep.queries >= 10 and rep.walltime_s >= 0.2 and rep.warmup_queries >= 1
        assert rep.h2d is None and rep.compute is not None  # CPU backend: no transfer split to report
        assert rep.latency.min <= rep.latency.median <= rep.latency.max
        assert "H2D Latency" not in rep.format()
        with pytest.raises(EdgeDeployError, match="--batch 0: must be from 1"):
            run_benchmark(eng, BenchConfig(batch=0), progress=False)


def test_bench_cli_json_and_compare(tmp_path, capsys):
    path, _ = make_classifier_onnx(tmp_path)
    out_json = tmp_path / "r.json"
    assert main(["bench", str(path), "--iterations", "15", "--warmup", "10", "--batch", "2", "--json", str(out_json),
                 "--no-progress"]) == 0
    rep = json.loads(out_json.read_text())
    assert rep["queries"] == 15 and rep["batch"] == 2 and rep["backend"] == "onnxruntime"
    assert "=== Performance summary ===" in capsys.readouterr().out

    # an FP16 copy of the same model: different precision, nearly identical outputs
    from onnxconverter_common import float16
    import onnx

    from edgedeploy.models.artifact import read_sidecar, write_sidecar

    fp16_path = tmp_path / "cls.fp16.onnx"
    onnx.save(float16.convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(fp16_path))
    meta = read_sidecar(path)
    meta.precision = "fp16"
    write_sidecar(fp16_path, meta)
    out_dir = tmp_path / "cmp"
    assert main(["bench", "--compare", str(path), str(fp16_path), "--iterations", "10", "--warmup", "5", "--out",
                 str(out_dir), "--no-progress"]) == 0
    table = (out_dir / "table.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| tiny_classifier") and "not run" not in line]
    assert len(rows) == 2 and "onnxruntime fp16" in rows[1]
    # every GPU backend has its row: measured where installed, else why not (here: a CPU machine)
    from edgedeploy.runtime.backends import gpu_backend_status

    for backend, why in gpu_backend_status().items():
        label = backend.replace("torch-cuda", "torch cuda")
        line = next(line for line in table.splitlines() if f"| {label}" in line)
        if why:  # on the GPU machine installed backends are measured (or say why they could not be built)
            assert f"not run: {why}" in line
    assert rows[0].rstrip(" |").endswith("100.00")  # the reference agrees with itself
    assert (out_dir / "latency_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_cli_needs_something_to_run(capsys):
    assert main(["bench"]) == 1
    assert "give an artifact" in capsys.readouterr().err
