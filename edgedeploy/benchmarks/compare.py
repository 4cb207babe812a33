"""`deploy bench --compare`: the same model across backends and precisions in one markdown table and one
latency-vs-accuracy plot, with the model's parameters and MACs (from the profiler) beside its latency.

Accuracy comes from an eval JSON when given (`--accuracy results.json`: {artifact path or label: value});
otherwise each entry's outputs are compared with the first entry's (the reference, usually FP32) on the same
seeded inputs -- top-1 agreement for classifiers, cosine similarity of the first output otherwise -- and the
plot's axis says so.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from edgedeploy.benchmarks.bench import BenchConfig, BenchReport, random_feed, run_benchmark
from edgedeploy.errors import EdgeDeployError


@dataclass
class CompareEntry:
    label: str  # "onnxruntime fp32", "tensorrt fp16", ...
    open: Callable[[], Any]  # returns an Engine (opened lazily so one failure does not stop the others)
    model: str = ""
    imgsz: int | None = None
    num_classes: int | None = None
    task: str = ""
    path: str = ""
    # False for a model with random weights (no --weights): its outputs say nothing about accuracy, so it gets no
    # agreement figure and is never the reference.
    comparable: bool = True


@dataclass
class CompareRow:
    entry: CompareEntry
    report: BenchReport | None = None
    params: int | None = None
    macs: int | None = None
    accuracy: float | None = None
    error: str = ""


def _profile(model: str, imgsz: int | None, num_classes: int | None, cache: dict) -> tuple[int | None, int | None]:
    key = (model, imgsz, num_classes)
    if key not in cache:
        try:
            from edgedeploy.models.artifact import describe_artifact
            from edgedeploy.models.complexity import count_macs, count_params
            from edgedeploy.models.registry import create_model

            net = create_model(model, num_classes=num_classes)
            cache[key] = (count_params(net), count_macs(net, describe_artifact(model=model, imgsz=imgsz).imgsz))
        except Exception:  # an unknown/custom model: the table shows "-" rather than failing the comparison
            cache[key] = (None, None)
    return cache[key]


def _agreement(ref: dict[str, np.ndarray], out: dict[str, np.ndarray], task: str) -> float:
    a, b = next(iter(ref.values())).astype(np.float64), next(iter(out.values())).astype(np.float64)
    if a.shape != b.shape:
        return float("nan")
    if task == "classify":
        return float((a.reshape(len(a), -1).argmax(1) == b.reshape(len(b), -1).argmax(1)).mean() * 100)
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12) * 100)


def run_compare(entries: Sequence[CompareEntry], config: BenchConfig, accuracy: dict[str, float] | None = None,
                agreement_batch: int = 8, progress: bool = True) -> list[CompareRow]:
    rows, cache = [], {}
    ref_out: dict[str, np.ndarray] | None = None
    for e in entries:
        row = CompareRow(e)
        if e.model:
            row.params, row.macs = _profile(e.model, e.imgsz, e.num_classes, cache)
        try:
            engine = e.open()
        except EdgeDeployError as err:
            row.error = str(err).splitlines()[0]
            rows.append(row)
            continue
        try:
            row.report = run_benchmark(engine, config, progress=progress, label=e.label)
            if accuracy is not None:
                row.accuracy = accuracy.get(e.label, accuracy.get(e.path))
            elif e.comparable:
                n = agreement_batch if (engine.max_batch or agreement_batch) >= agreement_batch else 1
                out = engine.infer(random_feed(engine, n, seed=1234))
                ref_out = ref_out if ref_out is not None else out
                row.accuracy = _agreement(ref_out, out, e.task)
        except EdgeDeployError as err:
            row.error = str(err).splitlines()[0]
        finally:
            engine.close()
        rows.append(row)
    return rows


def _fmt_count(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.2f} M"


def markdown_table(rows: Sequence[CompareRow], accuracy_name: str) -> str:
    head = ("| model | backend / precision | device | batch | latency median (ms) | p99 (ms) | throughput (img/s) | "
            f"params | MACs | {accuracy_name} |")
    lines = [head, "|" + "---|" * 10]
    for r in rows:
        e = r.entry
        if r.report is None:
            lines.append(f"| {e.model or '-'} | {e.label} | - | - | - | - | - | {_fmt_count(r.params)} | "
                         f"{_fmt_count(r.macs)} | not run: {r.error} |")
            continue
        rep = r.report
        acc = "-" if r.accuracy is None or np.isnan(r.accuracy) else f"{r.accuracy:.2f}"
        lines.append(
            f"| {e.model or '-'} | {e.label} | {rep.device} | {rep.batch} | {rep.latency.median:.3f} | "
            f"{rep.latency.percentiles.get(99.0, float('nan')):.3f} | {rep.images_per_s:.1f} | {_fmt_count(r.params)} | "
            f"{_fmt_count(r.macs)} | {acc} |"
        )
    return "\n".join(lines) + "\n"


def plot_latency_accuracy(rows: Sequence[CompareRow], path: str | os.PathLike, accuracy_name: str) -> Path | None:
    """Scatter of median latency vs accuracy, one labelled point per entry; None when nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgedeploy.io import atomic_path

    pts = [(r.report.latency.median, r.accuracy, r.entry.label) for r in rows
           if r.report is not None and r.accuracy is not None and not np.isnan(r.accuracy)]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for lat, acc, label in pts:
        ax.scatter(lat, acc, s=36)
        ax.annotate(label, (lat, acc), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("median latency (ms)")
    ax.set_ylabel(accuracy_name)
    ax.grid(alpha=0.3)
    ax.set_title("latency vs accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(path)


def load_accuracy(path: str | os.PathLike) -> tuple[dict[str, float], str]:
    """{"metric": "top-1 (%)", "values": {label or path: value}} or a flat {label: value} mapping."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeDeployError(f"cannot read accuracy file {path}: {e}") from e
    if "values" in d:
        return {k: float(v) for k, v in d["values"].items()}, str(d.get("metric", "accuracy"))
    return {k: float(v) for k, v in d.items()}, "accuracy"
