"""`deploy demo`: the main job end to end on the built-in synthetic shapes, with nothing to download.

1. generate the synthetic classification set and train mobilenetv3_small on it (the preset: ~3 min on 2 CPU cores),
2. export the best checkpoint: ONNX with the parity proof, FP16 and INT8 Q/DQ ONNX with their top-1 on the
   held-out split, and TensorRT / TensorRT-RTX engines when a builder is installed,
3. benchmark PyTorch eager and ONNX Runtime FP32/FP16/INT8 side by side (trtexec-style latencies),
4. print a summary and write it to OUT/summary.md and OUT/summary.json, with the latency-vs-accuracy plot.

Every stage is the public API a user would call (`train_classifier`, `export`, `run_compare`), so the demo is
also a worked example; each stage's own outputs stay in OUT/train, OUT/export and OUT/bench.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from edgedeploy.errors import EXIT_ENGINE_SKIPPED

DEMO_MODEL = "mobilenetv3_small"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEMO_MODEL, help=f"classification model to train (default {DEMO_MODEL})")
    parser.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    parser.add_argument("--epochs", type=int, help="training epochs (default: the synthetic preset's)")
    parser.add_argument("--bench-seconds", type=float, default=3.0, help="timed seconds per benchmark entry")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    summary = run_demo(args.model, Path(args.out), epochs=args.epochs, bench_seconds=args.bench_seconds,
                       progress=not args.no_progress)
    print()
    print(summary["markdown"])
    print(f"summary: {Path(args.out) / 'summary.md'}")
    return summary["exit_code"]


def _stage(title: str) -> None:
    print(f"\n=== {title} ===", flush=True)


def run_demo(model: str = DEMO_MODEL, out: Path = Path("runs/demo"), epochs: int | None = None,
             bench_seconds: float = 3.0, progress: bool = True) -> dict[str, Any]:
    """Train -> export (parity, FP16, INT8, engines) -> benchmark; returns the summary (also written to `out`)."""
    from edgedeploy.benchmarks.bench import BenchConfig
    from edgedeploy.benchmarks.compare import CompareEntry, markdown_table, plot_latency_accuracy, run_compare
    from edgedeploy.export import export
    from edgedeploy.io import atomic_write_json, atomic_write_text
    from edgedeploy.runtime.loader import load_engine
    from edgedeploy.train.classify import train_classifier

    out = Path(out)
    t0 = time.perf_counter()

    _stage(f"1/3 train {model} on the synthetic shapes")
    trained = train_classifier(model, "synthetic", epochs=epochs, out_dir=out / "train", progress=progress)

    _stage("2/3 export: ONNX + parity proof, FP16, INT8 Q/DQ, engines")
    report = export(model, log=lambda line: print(line, flush=True), weights=str(trained.best), fp16=True,
                    int8=True, out=str(out / "export"), eval_images=600, calib_images=128, progress=progress)
    exported = out / "export" / report.model
    steps = {s.name: s for s in report.steps}
    accuracy = {p: steps[p].details["accuracy"] for p in ("fp16", "int8")}
    top1 = {
        "fp32": accuracy["fp16"]["fp32"].get("top1"),
        "fp16": accuracy["fp16"]["low"].get("top1"),
        "int8": accuracy["int8"]["low"].get("top1"),
    }

    _stage("3/3 benchmark: PyTorch eager vs ONNX Runtime FP32 / FP16 / INT8 (CPU unless a GPU is present)")
    files = {p: exported / report.artifacts[s] for p, s in (("fp32", "simplify"), ("fp16", "fp16"), ("int8", "int8"))}
    entries = [CompareEntry(label="torch fp32 (eager)", open=lambda: load_engine(trained.best, backend="torch"),
                            model=report.model, imgsz=report.imgsz, num_classes=len(trained.class_names),
                            task="classify", path=str(trained.best))]
    entries += [CompareEntry(label=f"onnxruntime {p}", open=lambda f=f: load_engine(f, backend="onnxruntime"),
                             model=report.model, imgsz=report.imgsz, num_classes=len(trained.class_names),
                             task="classify", path=str(f)) for p, f in files.items()]
    measured = {"torch fp32 (eager)": top1["fp32"], **{f"onnxruntime {p}": top1[p] for p in files}}
    metric = "val top-1 (%)"
    rows = run_compare(entries, BenchConfig(duration_s=bench_seconds),
                       accuracy={k: 100 * v for k, v in measured.items() if v is not None}, progress=progress)
    bench_dir = out / "bench"
    table = markdown_table(rows, metric)
    atomic_write_text(bench_dir / "table.md", table)
    png = plot_latency_accuracy(rows, bench_dir / "latency_accuracy.png", metric)

    parity = steps["parity_simplified"].details
    engines = [s for s in report.steps if s.name.startswith("engine")]
    engine_line = (f"skipped: {report.engine_skip_reason.splitlines()[0]}" if report.engine_skipped else
                   ", ".join(f"{s.name.removeprefix('engine_')} {s.status}" for s in engines) or "not requested")
    builder = next((s.details.get("builder", "") + " " + str(s.details.get("builder_version", ""))
                    for s in engines if s.status in ("ok", "reused")), "")
    latencies = {r.entry.label: r.report.latency.median for r in rows if r.report is not None}
    lines = [
        f"# edgedeploy demo: {report.model} on synthetic shapes",
        "",
        f"* train: {trained.epochs} epochs in {trained.wall_s:.0f} s, val top-1 **{100 * trained.best_top1:.1f}%** "
        f"(best checkpoint `{trained.best}`)",
        f"* parity (ONNX Runtime vs PyTorch, {parity.get('n_inputs', '?')} inputs): max abs "
        f"{parity['max_abs']:.2e}, min cosine {parity['min_cosine']:.6f}, assert_allclose rtol {parity['rtol']} / "
        f"atol {parity['atol']}: passed",
        "* held-out top-1: " + ", ".join(f"{p.upper()} {100 * v:.1f}%" for p, v in top1.items() if v is not None)
        + f" ({accuracy['int8'].get('eval_images')} images)",
        f"* engines: {engine_line}" + (f" ({builder.strip()})" if builder.strip() else ""),
        f"* artifacts: `{exported}` (report: `{exported / 'export_report.json'}`)",
        "",
        table.rstrip(),
        "",
        f"Total {time.perf_counter() - t0:.0f} s." + (f" Plot: `{png}`." if png else ""),
    ]
    markdown = "\n".join(lines) + "\n"
    summary = {
        "model": report.model,
        "train": {"epochs": trained.epochs, "wall_s": trained.wall_s, "best_top1": trained.best_top1,
                  "checkpoint": str(trained.best)},
        "parity": {"max_abs": parity["max_abs"], "min_cosine": parity["min_cosine"], "passed": parity["passed"]},
        "top1": top1,
        "latency_median_ms": latencies,
        "engines": {s.name: s.status for s in engines},
        "engine_skipped": report.engine_skipped,
        "export_dir": str(exported),
        "markdown": markdown,
        # the export's own code: 3 when no TensorRT builder was found (ONNX artifacts still complete)
        "exit_code": EXIT_ENGINE_SKIPPED if report.engine_skipped else 0,
    }
    atomic_write_text(out / "summary.md", markdown)
    atomic_write_json(out / "summary.json", {k: v for k, v in summary.items() if k != "markdown"})
    return summary
