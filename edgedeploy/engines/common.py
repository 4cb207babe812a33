"""Builder logic shared by TensorRT and TensorRT-RTX (their Python APIs are the same shape).

parse ONNX with the ONNX parser (its errors are shown, not a bare traceback) -> strongly typed network ->
builder config (workspace limit, optimization profile for a dynamic batch, timing cache) ->
serialized engine written atomically, plus the JSON sidecar.

The `trt` module is passed in, so unit tests can inject a fake that records calls.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from edgedeploy.models.artifact import ArtifactMeta, write_sidecar
from edgedeploy.errors import EngineBuildError
from edgedeploy.io import atomic_write_bytes, sha256_file


@dataclass
class BuildRequest:
    onnx_path: Path
    engine_path: Path
    meta: ArtifactMeta  # filled in by the caller (model, task, IO, normalisation, precision); builder fields here
    batch: tuple[int, int, int] = (1, 1, 1)  # (min, opt, max) for a dynamic batch axis
    workspace_mb: int | None = None
    timing_cache: Path | None = None  # read before, written back after the build (TensorRT only)


@dataclass
class BuildResult:
    engine_path: Path
    sidecar_path: Path
    build_time_s: float
    engine_bytes: int
    builder: str
    builder_version: str
    warnings: list[str] = field(default_factory=list)
    timing_cache: str = ""  # "reused" | "created" | "n/a (...)"


def make_logger(trt: ModuleType):
    """A trt.ILogger that keeps every message (errors and warnings go into exceptions and the report)."""

    class CapturingLogger(trt.ILogger):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[tuple[Any, str]] = []

        def log(self, severity, msg) -> None:  # noqa: D401
            self.messages.append((severity, str(msg)))

        def at_most(self, level) -> list[str]:
            return [m for s, m in self.messages if int(s) <= int(level)]

    return CapturingLogger()


def parser_errors(parser) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node = ""
        try:
            node = f" (node {err.node()}: {err.node_name()} [{err.node_operator()}])"
        except Exception:  # noqa: BLE001  (older parsers lack the node accessors)
            pass
        out.append(f"{err.desc()}{node}" if hasattr(err, "desc") else str(err))
    return out


def network_flags(trt: ModuleType) -> int:
    """Strongly typed: precision comes from the ONNX. Accepted (ignored) by TensorRT 11, required for 10.x."""
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    return 1 << int(flag) if flag is not None else 0


def add_profile(trt: ModuleType, builder, network, config, batch: tuple[int, int, int]) -> dict[str, list]:
    """An optimization profile for every input with a dynamic (-1) batch axis; returns what was set."""
    shapes: dict[str, list] = {}
    profile = None
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if not any(d == -1 for d in dims):
            continue
        if any(d == -1 for d in dims[1:]):
            raise EngineBuildError(
                f"input {tensor.name} has dynamic non-batch dims {dims}: export with a fixed --imgsz"
            )
        profile = profile or builder.create_optimization_profile()
        mn, opt, mx = ([b] + dims[1:] for b in batch)
        profile.set_shape(tensor.name, mn, opt, mx)
        shapes[tensor.name] = [mn, opt, mx]
    if profile is not None:
        config.add_optimization_profile(profile)
    return shapes


class BuildInterrupt:
    """Ctrl-C while the C++ builder runs: a Python KeyboardInterrupt raised inside one of the builder's
    callbacks (logger, progress monitor) is swallowed by the bindings and the build runs on. So while
    building, SIGINT only sets a flag; a progress monitor (IProgressMonitor, TensorRT 10+ and TensorRT-RTX)
    returns False from step_complete to cancel the build at its next step, and once the builder returns
    we raise KeyboardInterrupt before anything is written (the CLI exits 130)."""

    def __init__(self) -> None:
        self.requested = threading.Event()
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:  # noqa: ARG002
        if not self.requested.is_set():
            print("\ninterrupt: cancelling the engine build (no engine will be written) ...", file=sys.stderr, flush=True)
        self.requested.set()

    def __enter__(self) -> "BuildInterrupt":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def raise_if_requested(self) -> None:
        if self.requested.is_set():
            raise KeyboardInterrupt("engine build cancelled")

    def monitor(self, trt: ModuleType):
        """A trt.IProgressMonitor that cancels the build once Ctrl-C was pressed (None if the API lacks it)."""
        base = getattr(trt, "IProgressMonitor", None)
        if base is None:
            return None
        requested = self.requested

        class CancellingMonitor(base):  # type: ignore[misc, valid-type]
            def __init__(self) -> None:
                base.__init__(self)
                self.steps = 0

            def phase_start(self, phase_name, parent_phase, num_steps) -> None:  # noqa: D401
                pass

            def step_complete(self, phase_name, step) -> bool:
                self.steps += 1
                return not requested.is_set()  # False cancels the build

            def phase_finish(self, phase_name) -> None:
                pass

        return CancellingMonitor()


def import_builder(module: str) -> ModuleType:
    """Import tensorrt / tensorrt_rtx_bindings with Ctrl-C deferred: a KeyboardInterrupt inside the native
    module's initialisation surfaces as an ImportError ("not installed"), the wrong diagnosis and exit code."""
    import importlib

    with BuildInterrupt() as interrupt:
        try:
            mod = importlib.import_module(module)
        except ImportError:
            interrupt.raise_if_requested()
            raise
    interrupt.raise_if_requested()
    return mod


def build_engine(trt: ModuleType, builder_name: str, req: BuildRequest, use_timing_cache: bool = True) -> BuildResult:
    """Parse, configure, build and write `req.engine_path` + sidecar. Raises EngineBuildError with the logs,
    KeyboardInterrupt (nothing written) when Ctrl-C was pressed at any point in here."""
    with BuildInterrupt() as interrupt:  # from parsing (its logger calls back into Python too) to the sidecar
        result = _build_engine(trt, builder_name, req, use_timing_cache, interrupt)
    interrupt.raise_if_requested()  # pressed during the (millisecond) write: the pair is complete, then stop
    return result


def _build_engine(trt: ModuleType, builder_name: str, req: BuildRequest, use_timing_cache: bool,
                  interrupt: BuildInterrupt) -> BuildResult:
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(req.onnx_path)):
        interrupt.raise_if_requested()
        msgs = parser_errors(parser) or logger.at_most(trt.ILogger.Severity.ERROR)
        raise EngineBuildError(
            f"{builder_name} ONNX parser rejected {req.onnx_path.name}:\n  " + "\n  ".join(msgs or ["(no message)"])
        )
    interrupt.raise_if_requested()
    config = builder.create_builder_config()
    if req.workspace_mb:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(req.workspace_mb) << 20)
    add_profile(trt, builder, network, config, req.batch)

    cache_state = "n/a (TensorRT-RTX: timing cache operations are no-ops)"
    if use_timing_cache and req.timing_cache is not None:
        data = req.timing_cache.read_bytes() if req.timing_cache.exists() else b""
        cache_state = "reused" if data else "created"
        cache = config.create_timing_cache(data)
        # ignore_mismatch=False: a cache from another GPU/TensorRT version is rejected (returns False), not used
        if cache is None or config.set_timing_cache(cache, False) is False:
            if not data:
                raise EngineBuildError(f"{builder_name} refused a new, empty timing cache")
            cache_state = f"rejected ({req.timing_cache.name} is from another GPU or TensorRT version): recreated"
            cache = config.create_timing_cache(b"")
            if cache is None or config.set_timing_cache(cache, False) is False:
                raise EngineBuildError(f"{builder_name} refused a new, empty timing cache")

    monitor = interrupt.monitor(trt)
    if monitor is not None:
        with contextlib.suppress(AttributeError, TypeError):
            config.progress_monitor = monitor
    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_time = time.perf_counter() - t0
    interrupt.raise_if_requested()  # before anything is written: no engine under its final name
    if serialized is None:
        msgs = logger.at_most(trt.ILogger.Severity.ERROR) or ["(the builder logged no error)"]
        raise EngineBuildError(f"{builder_name} failed to build {req.engine_path.name}:\n  " + "\n  ".join(msgs))
    blob = bytes(memoryview(serialized))

    if use_timing_cache and req.timing_cache is not None:
        atomic_write_bytes(req.timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))
    atomic_write_bytes(req.engine_path, blob)

    meta = req.meta
    meta.builder = builder_name
    meta.builder_version = str(getattr(trt, "__version__", ""))
    meta.build_time_s = round(build_time, 3)
    meta.onnx_sha256 = sha256_file(req.onnx_path)
    meta.batch = {"min": req.batch[0], "opt": req.batch[1], "max": req.batch[2]}
    meta.created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    sidecar = write_sidecar(req.engine_path, meta)
    return BuildResult(
        engine_path=req.engine_path,
        sidecar_path=sidecar,
        build_time_s=build_time,
        engine_bytes=len(blob),
        builder=builder_name,
        builder_version=meta.builder_version,
        warnings=logger.at_most(trt.ILogger.Severity.WARNING)[:20],
        timing_cache=cache_state,
    )


def cuda_device() -> tuple[str, str]:
    """(GPU name, compute capability "8.6") of device 0, or ("", "") without a CUDA GPU."""
    try:
        import torch

        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(0)
            return torch.cuda.get_device_name(0), f"{major}.{minor}"
    except Exception:  # noqa: BLE001
        pass
    return "", ""


# ------------------------------------------------------------------------------------------ builder capabilities
_NMS_SUPPORT: dict[str, dict[str, str]] = {}


def _nms_probe_models() -> dict[str, Any]:
    """One-node ONNX graphs for each in-graph NMS mode: ONNX NonMaxSuppression ("onnx") and the
    EfficientNMS_TRT plugin node ("trt"), as `export/tasks/detect.py` writes them."""
    import numpy as np
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper

    def model(nodes, inputs, outputs, inits=(), domains=()):
        g = helper.make_graph(nodes, "nms_probe", inputs, outputs, list(inits))
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]
                                 + [helper.make_opsetid(d, 1) for d in domains])

    vi = helper.make_tensor_value_info
    onnx_nms = model(
        [helper.make_node("NonMaxSuppression", ["boxes", "scores", "max", "iou", "conf"], ["sel"], name="nms")],
        [vi("boxes", T.FLOAT, [1, 8, 4]), vi("scores", T.FLOAT, [1, 2, 8])], [vi("sel", T.INT64, [None, 3])],
        [numpy_helper.from_array(np.array([4], np.int64), "max"),
         numpy_helper.from_array(np.array([0.5], np.float32), "iou"),
         numpy_helper.from_array(np.array([0.1], np.float32), "conf")])
    trt_nms = model(
        [helper.make_node("EfficientNMS_TRT", ["boxes", "scores"], ["num", "b", "s", "c"], name="efficient_nms",
                          domain="TRT", background_class=-1, box_coding=0, iou_threshold=0.5, max_output_boxes=4,
                          plugin_version="1", score_activation=0, score_threshold=0.1, class_agnostic=0)],
        [vi("boxes", T.FLOAT, [1, 8, 4]), vi("scores", T.FLOAT, [1, 8, 2])],
        [vi("num", T.INT32, [1, 1]), vi("b", T.FLOAT, [1, 4, 4]), vi("s", T.FLOAT, [1, 4]), vi("c", T.INT32, [1, 4])],
        domains=["TRT"])
    return {"onnx": onnx_nms, "trt": trt_nms}


def nms_support(trt: ModuleType, builder_name: str) -> dict[str, str]:
    """{nms mode: "" when this builder builds it, else the builder's own reason}, measured by building a
    one-node network per mode (milliseconds; cached per builder). TensorRT-RTX 1.7 measured: NonMaxSuppression
    parses but "has no runners", and the EfficientNMS_TRT plugin is not found."""
    if builder_name in _NMS_SUPPORT:
        return _NMS_SUPPORT[builder_name]
    out = {"none": ""}
    for mode, model in _nms_probe_models().items():
        logger = make_logger(trt)
        builder = trt.Builder(logger)
        network = builder.create_network(network_flags(trt))
        parser = trt.OnnxParser(network, logger)
        try:
            if not parser.parse(model.SerializeToString()):
                out[mode] = "ONNX parser: " + "; ".join(parser_errors(parser) or ["(no message)"])[:300]
                continue
            built = builder.build_serialized_network(network, builder.create_builder_config())
        except Exception as e:  # noqa: BLE001
            out[mode] = f"{type(e).__name__}: {e}"[:300]
            continue
        if built is None:
            msgs = logger.at_most(trt.ILogger.Severity.ERROR) or ["(the builder logged no error)"]
            out[mode] = "; ".join(m.strip() for m in msgs)[:300]
        else:
            out[mode] = ""
    _NMS_SUPPORT[builder_name] = out
    return out
