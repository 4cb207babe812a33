"""scripts/gpu_check.sh on a CPU machine: `--dry-run` says what it would run and carry, and a run of one step
records its (failed, here) status in the JSON and the doc section it writes, without touching the repo's docs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _wheels() -> list[str]:
    lines = (ROOT / "scripts" / "gpu_wheels.txt").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]


def test_dry_run_prints_steps_and_wheels_and_runs_nothing(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work")}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run"], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "nothing is executed" in out
    for req in _wheels():
        assert req in out
    for step in ("env", "install", "gpu_pipelines", "tests", "runtime_targets", "train", "fp16_accuracy", "soak", "memcheck", "racecheck"):
        assert f"[{step}]" in out
    assert "--no-index" in out and "-m 'gpu or emulated_gpu'" in out and "--device cuda" in out
    assert "-m gpu" in out and "tests/test_gpu_pipelines_cuda.py" in out  # issue 17's GPU tests, reported apart
    assert not (tmp_path / "out").exists() and not (tmp_path / "work").exists()


def test_unknown_option_is_refused():
    r = subprocess.run(["bash", str(SCRIPT), "--frobnicate"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown option" in r.stderr


def test_one_step_run_writes_json_and_doc_section(tmp_path):
    doc = tmp_path / "BENCHMARKS.md"
    doc.write_text("# Benchmarks\n\n## Other\n\nkept\n")
    env = {**os.environ, "OUT": str(tmp_path / "out"), "GPU_CHECK_WORK": str(tmp_path / "work"),
           "GPU_CHECK_DOC": str(doc), "GPU_CHECK_STEPS": "env", "PYTHON": sys.executable,
           "PATH": os.environ.get("PATH", "")}
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    status = {s["step"]: s["status"] for s in report["steps"]}
    has_gpu = shutil.which("nvidia-smi") is not None
    assert status["env"] == ("ok" if has_gpu else "failed")  # no nvidia-smi here: a recorded failure, not a crash
    assert all(status[s] == "not-selected" for s in status if s != "env")
    text = doc.read_text()
    assert "## GPU check (scripts/gpu_check.sh)" in text and "## Other\n\nkept" in text
    assert (tmp_path / "out" / "BENCHMARKS.md").read_text() == text


def test_report_carries_the_pytorch_cuda_overhead_and_camera_figures(tmp_path):
    """The GPU check's doc row for runtime_targets names the GPU backends' overhead and camera figures (PyTorch CUDA
    where TensorRT is absent), read from runtime_targets' JSON; CPU rows and CPU-preprocessed runs are left out."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gpu_check_report as rep
    finally:
        sys.path.pop(0)
    work = tmp_path / "work"
    (work / "bench").mkdir(parents=True)
    (work / "steps.tsv").write_text("runtime_targets\tok\t80\trc=0\n")
    rt = {"sections": {
        "overhead": {"rows": {"torch-cpu": {"bare": 2.0, "runtime": 2.1, "overhead": 0.05},
                              "torch-cuda": {"bare": 1.0, "runtime": 1.031, "overhead": 0.031}}},
        "camera": {"runs": [{"detector": "yolox_s (PyTorch cuda, GPU preprocessing + CUDA graph)", "camera_fps": 190.0,
                             "bare_fps": 200.0, "ratio": 0.95, "gpu_preprocess": True},
                            {"detector": "yolox_s (PyTorch cuda)", "camera_fps": 50.0, "bare_fps": 100.0,
                             "ratio": 0.5, "gpu_preprocess": False}]}}}
    (work / "bench" / "runtime_targets_cuda.json").write_text(json.dumps(rt))
    doc = tmp_path / "B.md"
    assert rep.main(str(work), str(tmp_path / "out"), str(doc)) == 0
    row = next(ln for ln in doc.read_text().splitlines() if ln.startswith("| runtime_targets |"))
    assert "overhead torch-cuda +3.1% (target <= 5%)" in row
    assert "GPU preprocessing + CUDA graph): 190.0 vs 200.0 FPS bare = 95% (target >= 90%)" in row
    assert "torch-cpu" not in row and "= 50%" not in row
