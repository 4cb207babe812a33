"""benchmarks/runtime_targets.py runs end to end on whatever this machine has (CPU here, the GPU sections on the
GPU machine) and records real figures: the script that measures issue 6's speed targets must not rot."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "runtime_targets.py"


def test_runtime_targets_benchmark_writes_measured_figures(tmp_path):
    spec = importlib.util.spec_from_file_location("runtime_targets", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    result = mod.main(["--iters", "3", "--rounds", "1", "--frames", "4", "--out", str(tmp_path), "--no-doc"])
    device = result["env"]["device"]
    saved = json.loads((tmp_path / f"runtime_targets_{device}.json").read_text())
    s = saved["sections"]
    assert s["preprocess"]["cpu_ms"] > 0 and s["nms"]["cpu_ms"] > 0
    assert s["nms"]["kept"] > 10  # real suppression work over 8400 x 80 candidates
    for row in s["overhead"]["rows"].values():
        assert row["bare"] > 0 and row["runtime"] > 0 and "overhead" in row
    for run in s["camera"]["runs"]:
        assert run["frames"] == 4 and run["bare_fps"] > 0 and run["camera_fps"] > 0
    assert set(s["overhead"]["gpu_backends"]) == {"tensorrt", "torch-cuda", "onnxruntime-cuda"}
    if device == "cpu":
        assert s["preprocess"]["status"] == "skipped" and s["overhead"]["status"] == "partial"
        assert all(v.startswith(("not installed", "no GPU")) for v in s["overhead"]["gpu_backends"].values())
    else:
        assert s["preprocess"]["max_abs_diff_x255"] <= 1.0 and s["nms"]["same_kept_boxes"]
