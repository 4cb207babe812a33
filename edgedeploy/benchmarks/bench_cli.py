"""`deploy bench`: trtexec-style latency/throughput of an engine, ONNX file or PyTorch model.

    deploy bench model.fp16.engine --batch 8 --duration 5
    deploy bench model.onnx --iterations 200 --json report.json
    deploy bench --model mobilenetv3_small                      # PyTorch eager
    deploy bench --compare model.onnx model.int8.onnx model.fp16.engine --model mobilenetv3_small --out cmp/
"""

from __future__ import annotations

import argparse

from edgedeploy import options as opt


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", nargs="*", help=".engine / .onnx / .pt files (several with --compare)")
    parser.add_argument("--model", help="registry model: benchmarked with PyTorch eager (and named in --compare)")
    parser.add_argument("--weights", help="checkpoint for --model")
    parser.add_argument("--imgsz", type=opt.IMGSZ.arg, help="input size for --model (default: the model's)")
    parser.add_argument("--num-classes", type=opt.NUM_CLASSES.arg, help="classes in --weights, when not the model's default")
    parser.add_argument("--backend", choices=["tensorrt", "onnxruntime", "onnxruntime-cuda", "torch"],
                        help="override the backend")
    parser.add_argument("--device", help="cpu | cuda (ONNX Runtime / PyTorch)")
    parser.add_argument("--batch", type=opt.BATCH.arg, default=1, help="batch size (default 1)")
    parser.add_argument("--warmup", type=opt.WARMUP_MS.arg, default=200.0, help="warm-up in ms (default 200, as trtexec)")
    parser.add_argument("--duration", type=opt.DURATION_S.arg, default=3.0, help="timed run in seconds (default 3, as trtexec)")
    parser.add_argument("--iterations", type=opt.ITERATIONS.arg, help="exact number of timed queries (overrides --duration)")
    parser.add_argument("--percentiles", type=opt.percentiles.arg, default=(90.0, 95.0, 99.0), help="comma-separated (default 90,95,99)")
    graph = parser.add_mutually_exclusive_group()
    graph.add_argument("--cuda-graph", dest="cuda_graph", action="store_true", default=True,
                       help="TensorRT: replay inference as a CUDA graph (default on, as trtexec 11)")
    graph.add_argument("--no-cuda-graph", dest="cuda_graph", action="store_false")
    parser.add_argument("--json", help="also write the report(s) as JSON to this file")
    parser.add_argument("--compare", action="store_true", help="benchmark every artifact (and --model with PyTorch) "
                        "into a markdown table and a latency-vs-accuracy PNG, plus every installed GPU backend "
                        "(TensorRT, PyTorch CUDA, ONNX Runtime CUDA) side by side; absent ones are listed as such")
    parser.add_argument("--accuracy", help="--compare: JSON of measured accuracy {label or path: value}")
    parser.add_argument("--out", default="bench_compare", help="--compare: output folder (table.md, latency_accuracy.png)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _entry_for_artifact(path: str, args: argparse.Namespace):
    from pathlib import Path

    from edgedeploy.benchmarks.compare import CompareEntry
    from edgedeploy.models.artifact import read_sidecar
    from edgedeploy.runtime.loader import engine_kind, load_engine

    meta = read_sidecar(path, required=False)
    backend = args.backend or engine_kind(path)
    precision = meta.precision if meta else "fp32"
    label = f"{backend} {precision}"
    return CompareEntry(
        label=label if not args.compare else f"{label} ({Path(path).name})",
        open=lambda: load_engine(path, backend=args.backend, device=args.device, model=args.model,
                                 cuda_graph=args.cuda_graph, num_classes=args.num_classes, imgsz=args.imgsz),
        model=(meta.model if meta else args.model) or "", imgsz=int(meta.input_shape[-1]) if meta else args.imgsz,
        num_classes=len(meta.class_names) if meta and meta.class_names else args.num_classes,
        task=meta.task if meta else "", path=path,
    )


def _entry_for_model(args: argparse.Namespace, device: str | None = None, name: str | None = None):
    from edgedeploy.benchmarks.compare import CompareEntry
    from edgedeploy.models.artifact import describe_artifact
    from edgedeploy.models.registry import create_model
    from edgedeploy.runtime.backends.torch import TorchEngine

    desc = describe_artifact(model=name or args.model, imgsz=args.imgsz)
    info, size = desc.info, desc.imgsz
    device = device or args.device
    weights = args.weights if name in (None, args.model) else None

    def open_engine():
        net = create_model(info.name, num_classes=args.num_classes, weights=weights)
        return TorchEngine(net, input_shape=(-1, 3, size, size), device=device, cuda_graph=args.cuda_graph)

    label = "torch fp32 (eager)" if device is None else f"torch {device} fp32"
    return CompareEntry(label=label, open=open_engine, model=info.name, imgsz=size, task=info.task,
                        num_classes=args.num_classes, comparable=bool(weights))


def _unavailable(label: str, why: str, model: str = "", imgsz: int | None = None):
    from edgedeploy.benchmarks.compare import CompareEntry
    from edgedeploy.errors import EdgeDeployError

    def refuse():
        raise EdgeDeployError(why)

    return CompareEntry(label=label, open=refuse, model=model, imgsz=imgsz, comparable=False)


def gpu_entries(args: argparse.Namespace, entries: list) -> list:
    """--compare: one row per GPU backend beside the user's entries, measured where installed, else listed as
    "not installed"/"no GPU" (never a traceback)."""
    from pathlib import Path

    from edgedeploy.benchmarks.compare import CompareEntry
    from edgedeploy.models.artifact import read_sidecar
    from edgedeploy.runtime.backends import gpu_backend_status
    from edgedeploy.runtime.loader import device_index

    status = gpu_backend_status()
    onnx = [p for p in args.artifacts if p.endswith(".onnx")]
    plans = [p for p in args.artifacts if p.endswith((".engine", ".plan"))]
    metas = [read_sidecar(p, required=False) for p in args.artifacts]
    model = args.model or next((m.model for m in metas if m and m.model), "")
    gpu = args.device if args.device and args.device.startswith("cuda") else "cuda"
    out = []
    if not plans:
        out.append(_unavailable("tensorrt", status["tensorrt"] or "no .engine given (`deploy export --builder "
                                "tensorrt` on the GPU machine)", model, args.imgsz))
    for p in onnx:
        label = f"onnxruntime-cuda ({Path(p).name})"
        meta = read_sidecar(p, required=False)
        if status["onnxruntime-cuda"]:
            out.append(_unavailable(label, status["onnxruntime-cuda"], model, args.imgsz))
            continue

        def open_ort(p=p):
            from edgedeploy.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaEngine

            return OnnxRuntimeCudaEngine(p, device_index=device_index(gpu))

        out.append(CompareEntry(label=f"onnxruntime-cuda {meta.precision if meta else 'fp32'} ({Path(p).name})",
                                open=open_ort, model=model, imgsz=int(meta.input_shape[-1]) if meta else None,
                                task=meta.task if meta else "", path=p))
    if any(e.label.startswith("torch cuda") or (e.label == "torch fp32 (eager)" and not status["torch-cuda"]
                                                and (args.device or "cuda").startswith("cuda")) for e in entries):
        return out
    if status["torch-cuda"]:
        out.append(_unavailable("torch cuda", status["torch-cuda"], model, args.imgsz))
        return out
    try:
        out.append(_entry_for_model(args, device=gpu, name=model or None))
    except Exception as e:  # noqa: BLE001 - a model outside the registry: listed, not fatal
        out.append(_unavailable("torch cuda", f"no registry model to build ({str(e).splitlines()[0]}); pass --model",
                                model, args.imgsz))
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from edgedeploy.benchmarks.bench import BenchConfig, run_benchmark
    from edgedeploy.errors import EdgeDeployError
    from edgedeploy.io import atomic_write_json, atomic_write_text

    if not args.artifacts and not args.model:
        raise EdgeDeployError("give an artifact (.engine/.onnx/.pt) or --model NAME to benchmark")
    percentiles = opt.percentiles(args.percentiles)
    config = BenchConfig(batch=args.batch, warmup_ms=args.warmup, duration_s=args.duration,
                         iterations=args.iterations, percentiles=percentiles)
    entries = ([_entry_for_model(args)] if args.model and (args.compare or not args.artifacts) else [])
    entries += [_entry_for_artifact(p, args) for p in args.artifacts]
    if args.compare:
        entries += gpu_entries(args, entries)

    if args.compare:
        from edgedeploy.benchmarks.compare import load_accuracy, markdown_table, plot_latency_accuracy, run_compare

        reference = next((e.label for e in entries if e.comparable), "-")
        accuracy, metric = (load_accuracy(args.accuracy) if args.accuracy else
                            (None, f"agreement with {reference} (%)"))
        rows = run_compare(entries, config, accuracy=accuracy, progress=not args.no_progress)
        out = Path(args.out)
        table = markdown_table(rows, metric)
        atomic_write_text(out / "table.md", table)
        png = plot_latency_accuracy(rows, out / "latency_accuracy.png", metric)
        print(table)
        print(f"wrote {out / 'table.md'}" + (f" and {png}" if png else ""))
        if args.json:
            atomic_write_json(args.json, [r.report.to_dict() if r.report else {"label": r.entry.label, "error": r.error}
                                          for r in rows])
        return 0 if any(r.report for r in rows) else 1

    reports = []
    for e in entries:
        with e.open() as engine:
            rep = run_benchmark(engine, config, progress=not args.no_progress, label=e.label)
        print(f"=== {e.label} ===")
        print(rep.format())
        reports.append(rep.to_dict())
    if args.json:
        atomic_write_json(args.json, reports[0] if len(reports) == 1 else reports)
    return 0
