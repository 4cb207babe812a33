"""Gather scripts/gpu_check.sh's step results into one JSON and the "GPU check" section of docs/BENCHMARKS.md.

Usage: python scripts/gpu_check_report.py WORK_DIR OUT_DIR DOC_PATH
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

SECTION = "## GPU check (scripts/gpu_check.sh)"


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except Exception:
        return None


def _tests(xml: Path) -> dict[str, Any] | None:
    try:
        root = ET.parse(xml).getroot()
    except Exception:
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    a = suite.attrib
    failed = [tc.get("classname", "") + "::" + tc.get("name", "") for tc in suite.iter("testcase")
              if tc.find("failure") is not None or tc.find("error") is not None]
    return {"tests": int(a.get("tests", 0)), "failures": int(a.get("failures", 0)), "errors": int(a.get("errors", 0)),
            "skipped": int(a.get("skipped", 0)), "time_s": float(a.get("time", 0)), "failed": failed[:30]}


def collect(work: Path) -> dict[str, Any]:
    steps = []
    for line in (work / "steps.tsv").read_text().splitlines() if (work / "steps.tsv").exists() else []:
        name, status, secs, note = (line.split("\t") + ["", "", "", ""])[:4]
        log = work / f"{name}.log"
        tail = log.read_text(errors="replace").splitlines()[-6:] if log.exists() else []
        steps.append({"step": name, "status": status, "seconds": int(secs or 0), "note": note, "log_tail": tail})
    doctor = _json(work / "doctor.json") or {}
    gpu = next((c for c in doctor.get("checks", []) if c.get("name") == "gpu"), {})
    line = next((c for c in doctor.get("checks", []) if c.get("name") == "cuda-line"), {})
    bench = next(iter(sorted((work / "bench").glob("runtime_targets_*.json"))), None) if (work / "bench").exists() else None
    train_log = (work / "train.log").read_text(errors="replace") if (work / "train.log").exists() else ""
    top1 = re.findall(r"top-1[^0-9]*([0-9.]+)%", train_log)
    return {
        "when": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "gpu": gpu.get("detail"), "cuda_line": line.get("detail"),
        "steps": steps,
        "gpu_pipelines": _tests(work / "gpu_pipelines.xml"),
        "tests": _tests(work / "tests.xml"),
        "runtime_targets": _json(bench) if bench else None,
        "train": {"best_pt": (work / "train" / "best.pt").exists(), "val_top1_percent": float(top1[-1]) if top1 else None},
        "fp16_accuracy": _json(work / "fp16_accuracy.json"),
        "soak": _json(work / "soak.json"),
    }


def gpu_figures(rt: dict[str, Any]) -> str:
    """The overhead and camera figures of the GPU backends runtime_targets measured (PyTorch CUDA where TensorRT is
    absent), from its JSON."""
    sec = rt.get("sections", {})
    parts = []
    for name, row in sec.get("overhead", {}).get("rows", {}).items():
        if name != "torch-cpu" and "overhead" in row:
            parts.append(f"overhead {name} {100 * row['overhead']:+.1f}% (target <= 5%)")
    for run in sec.get("camera", {}).get("runs", []):
        if run.get("gpu_preprocess"):
            parts.append(f"camera {run['detector']}: {run['camera_fps']:.1f} vs {run['bare_fps']:.1f} FPS bare "
                         f"= {100 * run['ratio']:.0f}% (target >= 90%)")
    return "; ".join(parts) or "no GPU backend figure"


def section(r: dict[str, Any]) -> str:
    lines = [SECTION, "",
             f"Run {r['when']} on {r['gpu'] or 'an unknown GPU'} ({r['cuda_line'] or 'CUDA line unknown'}).", "",
             "| step | status | s | result |", "|---|---|---|---|"]
    for s in r["steps"]:
        result = ""
        if s["step"] in ("tests", "gpu_pipelines") and r.get(s["step"]):
            t = r[s["step"]]
            result = f"{t['tests']} tests: {t['failures'] + t['errors']} failed, {t['skipped']} skipped"
        elif s["step"] == "train" and r["train"]["val_top1_percent"] is not None:
            result = f"val top-1 {r['train']['val_top1_percent']:.1f}% after 2 epochs"
        elif s["step"] == "fp16_accuracy" and r["fp16_accuracy"]:
            f = r["fp16_accuracy"]
            result = (f"top-1 FP32 {100 * f['fp32']['top1']:.2f}% / FP16 {100 * f['fp16']['top1']:.2f}% "
                      f"({f['fp32']['n']} images)")
        elif s["step"] == "soak" and r["soak"]:
            g = r["soak"]["growth_after_first_1000_mib"]
            result = (f"{r['soak']['frames']} frames in {r['soak']['seconds']} s; growth after frame 1000: host "
                      f"{g['rss_mib']} MiB, GPU {g['gpu_used_mib']} MiB (flat: {r['soak']['flat']})")
        elif s["step"] in ("memcheck", "racecheck"):
            tail = " ".join(s["log_tail"])
            m = re.search(r"ERROR SUMMARY: (\d+) error", tail) or re.search(r"RACECHECK SUMMARY: (\d+) hazard", tail)
            result = f"{m.group(1)} errors/hazards" if m else s["note"]
        elif s["step"] == "runtime_targets":
            result = (gpu_figures(r["runtime_targets"]) + "; all figures in 'Runtime targets (cuda)' below"
                      if r["runtime_targets"] else s["note"])
        else:
            result = s["note"]
        lines.append(f"| {s['step']} | {s['status']} | {s['seconds']} | {result} |")
    return "\n".join(lines) + "\n\nRaw: gpu_check.json (the run's $OUT).\n"


def main(work: str, out: str, doc: str) -> int:
    r = collect(Path(work))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "gpu_check.json").write_text(json.dumps(r, indent=2))
    docp = Path(doc)
    text = docp.read_text() if docp.exists() else "# Benchmarks\n"
    body = section(r)
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: body + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + body
    docp.write_text(text)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(*sys.argv[1:4]))
