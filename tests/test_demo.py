"""`deploy demo` (the README's first command) end to end, on a 2-epoch schedule to keep CI short; the full
preset's accuracy is asserted by tests/test_train_classify.py::test_synthetic_preset_reaches_90_percent."""

from __future__ import annotations

import importlib.util
import json

import pytest

from edgedeploy.cli import main
from edgedeploy.errors import EXIT_ENGINE_SKIPPED

HAS_BUILDER = any(importlib.util.find_spec(m) for m in ("tensorrt", "tensorrt_rtx_bindings"))


@pytest.mark.slow
def test_demo_trains_exports_proves_parity_and_benchmarks(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EDGEDEPLOY_DATA", str(tmp_path / "cache"))
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--epochs", "2", "--bench-seconds", "0.3", "--no-progress"])
    assert rc == (0 if HAS_BUILDER else EXIT_ENGINE_SKIPPED)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["parity"]["passed"] and summary["parity"]["max_abs"] < 1e-3
    assert summary["train"]["epochs"] == 2 and 0 < summary["train"]["best_top1"] <= 1
    assert set(summary["top1"]) == {"fp32", "fp16", "int8"} and all(0 <= v <= 1 for v in summary["top1"].values())
    assert summary["top1"]["fp32"] == pytest.approx(summary["train"]["best_top1"], abs=1e-9)  # same split, same code
    assert set(summary["latency_median_ms"]) == {"torch fp32 (eager)", "onnxruntime fp32", "onnxruntime fp16",
                                                 "onnxruntime int8"}
    assert all(v > 0 for v in summary["latency_median_ms"].values())
    if HAS_BUILDER:
        assert summary["engines"] == {"engine_fp32": "ok", "engine_fp16": "ok", "engine_int8": "ok"}
    for name in ("summary.md", "bench/table.md", "bench/latency_accuracy.png", "train/best.pt", "train/results.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "# edgedeploy demo" in printed and "onnxruntime int8" in printed
