"""trtexec-style benchmarking of any `Engine`: warm-up, a timed run, and trtexec's statistics and warnings.

Definitions mirror trtexec (samples/common/sampleReporting.cpp):
* percentile P = sorted[max(N - 1 - int((1 - P/100) * N), 0)], computed in float32 like trtexec's `float`;
* median averages the two middle values when N is even;
* Latency = H2D + GPU compute + D2H when the backend measures the split, else the host wall time of the call;
* throughput = N / walltime queries/s, and batch * N / walltime images/s, walltime spanning the timed run;
* warnings: enqueue-bound, transfer-bound, and unstable GPU compute (coefficient of variation > 2.5 %).
Defaults: 200 ms warm-up, 3 s duration, at least 10 iterations, percentiles 90/95/99.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from edgedeploy.errors import EdgeDeployError

UNSTABLE_COV_PERCENT = 2.5
DEFAULT_PERCENTILES = (90.0, 95.0, 99.0)


def trt_percentile(sorted_values: Sequence[float], percentile: float) -> float:
    """trtexec's findPercentile on an ascending list (float32 arithmetic, as in its C++)."""
    n = len(sorted_values)
    if n == 0:
        return float("inf")
    if not 0.0 <= percentile <= 100.0:
        raise ValueError("percentile must be in [0, 100]")
    exclude = int((np.float32(1) - np.float32(percentile) / np.float32(100)) * np.float32(n))
    return float(sorted_values[max(n - 1 - exclude, 0)])


def trt_median(sorted_values: Sequence[float]) -> float:
    n = len(sorted_values)
    if n == 0:
        return float("nan")
    if n % 2:
        return float(sorted_values[n // 2])
    return (float(sorted_values[n // 2 - 1]) + float(sorted_values[n // 2])) / 2


@dataclass
class Stats:
    min: float
    max: float
    mean: float
    median: float
    percentiles: dict[float, float]
    cov_percent: float  # coefficient of variation, 100 * std / mean
    n: int

    @classmethod
    def of(cls, values: Sequence[float], percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> "Stats":
        v = sorted(float(x) for x in values)
        if not v:
            raise ValueError("no values")
        mean = float(np.mean(v))
        std = float(np.std(v))  # population std, as trtexec computes it
        return cls(
            min=v[0], max=v[-1], mean=mean, median=trt_median(v),
            percentiles={float(p): trt_percentile(v, p) for p in percentiles},
            cov_percent=100.0 * std / mean if mean > 0 else 0.0, n=len(v),
        )

    def line(self, title: str, unit: str = "ms") -> str:
        pct = ", ".join(f"percentile({p:g}%) = {x:.6g} {unit}" for p, x in self.percentiles.items())
        return (f"{title}: min = {self.min:.6g} {unit}, max = {self.max:.6g} {unit}, mean = {self.mean:.6g} {unit}, "
                f"median = {self.median:.6g} {unit}, {pct}")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["percentiles"] = {f"p{p:g}": x for p, x in self.percentiles.items()}
        return d


@dataclass
class BenchConfig:
    batch: int = 1
    warmup_ms: float = 200.0
    duration_s: float = 3.0
    iterations: int | None = None  # exact count of timed iterations; overrides duration
    min_iterations: int = 10
    percentiles: tuple[float, ...] = DEFAULT_PERCENTILES
    seed: int = 0

    def __post_init__(self) -> None:  # the shared validators: BenchConfig(iterations=0) fails as the CLI does
        from edgedeploy import options as opt

        self.batch = opt.BATCH.check(self.batch)
        self.warmup_ms = opt.WARMUP_MS.check(self.warmup_ms)
        self.duration_s = opt.DURATION_S.check(self.duration_s)
        self.iterations = opt.ITERATIONS.check_optional(self.iterations)
        self.min_iterations = opt.ITERATIONS.check(self.min_iterations, "min_iterations")
        self.percentiles = opt.percentiles(self.percentiles)


@dataclass
class BenchReport:
    backend: str
    device: str
    batch: int
    warmup_queries: int
    warmup_ms: float
    queries: int
    walltime_s: float
    latency: Stats
    enqueue: Stats | None = None
    h2d: Stats | None = None
    compute: Stats | None = None
    d2h: Stats | None = None
    cuda_graph: bool | None = None
    label: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def qps(self) -> float:
        return self.queries / self.walltime_s if self.walltime_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        return self.qps * self.batch

    def format(self) -> str:
        lines = [
            f"Warmup completed {self.warmup_queries} queries over {self.warmup_ms:.0f} ms",
            f"Timing trace has {self.queries} queries over {self.walltime_s:.5g} s",
            "=== Performance summary ===",
            f"Throughput: {self.qps:.6g} qps ({self.images_per_s:.6g} images/s at batch {self.batch})",
            self.latency.line("Latency"),
        ]
        for title, s in (("Enqueue Time", self.enqueue), ("H2D Latency", self.h2d), ("GPU Compute Time", self.compute),
                         ("D2H Latency", self.d2h)):
            if s is not None:
                lines.append(s.line(title if title != "GPU Compute Time" or self.device != "cpu" else "Compute Time"))
        lines.append(f"Total Host Walltime: {self.walltime_s:.5g} s")
        if self.compute is not None:
            lines.append(f"Total {'GPU ' if self.device != 'cpu' else ''}Compute Time: "
                         f"{self.compute.mean * self.compute.n / 1e3:.5g} s")
        if self.warnings:
            lines += self.warnings
        lines.append(f"Backend: {self.backend} on {self.device}" +
                     ("" if self.cuda_graph is None else f", CUDA graph {'on' if self.cuda_graph else 'off'}"))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "label": self.label, "backend": self.backend, "device": self.device, "batch": self.batch,
            "cuda_graph": self.cuda_graph, "warmup_queries": self.warmup_queries, "warmup_ms": self.warmup_ms,
            "queries": self.queries, "walltime_s": self.walltime_s, "throughput_qps": self.qps,
            "throughput_images_per_s": self.images_per_s, "warnings": self.warnings,
        }
        for k in ("latency", "enqueue", "h2d", "compute", "d2h"):
            s = getattr(self, k)
            d[k + "_ms"] = s.to_dict() if s is not None else None
        return d


def report_warnings(enqueue: Stats | None, h2d: Stats | None, compute: Stats | None, d2h: Stats | None,
                    device: str) -> list[str]:
    """trtexec's three warnings, on medians as trtexec compares them."""
    out: list[str] = []
    if compute is None:
        return out
    if enqueue is not None and device != "cpu" and enqueue.median > compute.median:
        out.append("* Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be "
                   "under-utilized. If not already in use, CUDA graphs (--cuda-graph) may increase the throughput.")
    if h2d is not None and h2d.median >= compute.median:
        out.append("* Throughput may be bound by host-to-device transfers for the inputs rather than GPU Compute "
                   "and the GPU may be under-utilized. Keep inputs on the GPU (GPU preprocessing).")
    if d2h is not None and d2h.median >= compute.median:
        out.append("* Throughput may be bound by device-to-host transfers for the outputs rather than GPU Compute "
                   "and the GPU may be under-utilized. Keep post-processing on the GPU (NMS inside the engine).")
    if compute.cov_percent > UNSTABLE_COV_PERCENT:
        what, fix = ("GPU compute", "Lock the GPU clocks (nvidia-smi -lgc), close other GPU workloads, or run longer.")
        if device == "cpu":
            what, fix = "Compute", "Close other workloads, pin threads, or run longer."
        out.append(f"* {what} time is unstable, with coefficient of variance = {compute.cov_percent:.4g}%. {fix}")
    return out


def random_feed(engine: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Inputs matching the engine's specs at `batch` (dynamic spatial dims need a static shape in the artifact)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for spec in engine.inputs:
        shape = [batch if i == 0 else d for i, d in enumerate(spec.shape)]
        if any(d < 0 for d in shape):
            raise EdgeDeployError(f"input {spec.describe()} has dynamic dimensions besides the batch; "
                                  "benchmark an artifact exported at a fixed image size")
        if np.issubdtype(spec.dtype, np.floating):
            feed[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        else:
            feed[spec.name] = rng.integers(0, 255, shape).astype(spec.dtype)
    return feed


def run_benchmark(engine: Any, config: BenchConfig = BenchConfig(), feed: Mapping[str, np.ndarray] | None = None,
                  progress: bool = True, label: str = "") -> BenchReport:
    """Warm up for `warmup_ms`, then time `iterations` queries (or `duration_s`, at least `min_iterations`)."""
    from tqdm.auto import tqdm

    if config.batch < 1:
        raise EdgeDeployError("--batch must be >= 1")
    if engine.max_batch is not None and config.batch > engine.max_batch:
        raise EdgeDeployError(f"batch {config.batch} exceeds the artifact's maximum batch {engine.max_batch}; "
                              "re-export with a larger dynamic batch range")
    feed = dict(feed) if feed is not None else random_feed(engine, config.batch, config.seed)
    feed = engine.validate(feed)
    infer = engine._infer  # validated once above: the timed loop measures the backend, not our checks

    warm_n, t0 = 0, time.perf_counter()
    while warm_n == 0 or (time.perf_counter() - t0) * 1e3 < config.warmup_ms:
        infer(feed)
        warm_n += 1
    warm_ms = (time.perf_counter() - t0) * 1e3

    samples: list[Any] = []
    bar = tqdm(total=config.iterations or None, desc=f"bench {label or engine.backend}", unit="q", leave=False,
               disable=not progress)
    start = time.perf_counter()
    while True:
        infer(feed)
        samples.append(engine.last_timing)
        bar.update(1)
        n = len(samples)
        if config.iterations is not None:
            if n >= config.iterations:
                break
        elif n >= config.min_iterations and time.perf_counter() - start >= config.duration_s:
            break
    walltime = time.perf_counter() - start
    bar.close()

    def stats(attr: str) -> Stats | None:
        vals = [getattr(t, attr) for t in samples]
        return None if any(v is None for v in vals) else Stats.of(vals, config.percentiles)

    h2d, compute, d2h, enqueue = stats("h2d_ms"), stats("compute_ms"), stats("d2h_ms"), stats("enqueue_ms")
    if h2d is not None and compute is not None and d2h is not None:
        latency = Stats.of([t.h2d_ms + t.compute_ms + t.d2h_ms for t in samples], config.percentiles)
    else:
        latency = Stats.of([t.latency_ms for t in samples], config.percentiles)
    warnings = report_warnings(enqueue, h2d, compute, d2h, engine.device)
    graph = getattr(engine, "graph", None)
    if graph is not None and getattr(graph, "error", None):
        warnings.append(f"* CUDA graph capture failed, ran with plain enqueue: {graph.error}")
    return BenchReport(
        backend=engine.backend, device=engine.device, batch=config.batch, warmup_queries=warm_n, warmup_ms=warm_ms,
        queries=len(samples), walltime_s=walltime, latency=latency, enqueue=enqueue, h2d=h2d, compute=compute,
        d2h=d2h, cuda_graph=getattr(engine, "use_cuda_graph", None), label=label,
        warnings=warnings,
    )
