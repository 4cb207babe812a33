"""TensorRT backend (TensorRT 10/11 API; TensorRT-RTX for engines its builder made).

Order of checks on load: sidecar (builder, version, compute capability) -> file size -> deserialise. An engine
from another TensorRT version or GPU is refused with `EngineCompatibilityError` saying to rebuild it, before
TensorRT gets a chance to crash on it.

Execution: IO discovered with `num_io_tensors`/`get_tensor_name`/`get_tensor_mode`; device buffers sized for
the optimisation profile's max shapes and pinned host buffers through cuda-python; `set_input_shape` for the
dynamic batch; `set_tensor_address` + `execute_async_v3` on this engine's own stream. Optional CUDA graph:
enqueue once, capture, replay; re-captured when input shapes change; plain execution when capture fails.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgedeploy.models.artifact import ArtifactMeta, read_sidecar
from edgedeploy.errors import EdgeDeployError, EngineCompatibilityError
from edgedeploy.runtime import cuda
from edgedeploy.runtime.engine import DYNAMIC, Capabilities, Engine, TensorSpec, Timing

# Smallest plausible serialized engine: real ones are hundreds of KB; anything tiny is a truncated download.
MIN_ENGINE_BYTES = 1024


def _version_key(v: str) -> tuple[str, ...]:
    """TensorRT plans are tied to the exact library version: compare every component that both sides give."""
    return tuple(p for p in str(v).strip().split(".") if p)


def check_engine_compat(
    meta: ArtifactMeta | None,
    *,
    runtime_builder: str,
    runtime_version: str,
    device_cc: str,
    path: str | os.PathLike,
) -> None:
    """Refuse an engine built by another TensorRT flavour/version or for another GPU, with the fix in the message."""
    name = Path(path).name
    if meta is None:
        return  # no sidecar: nothing to check ahead of time; deserialisation is the last line of defence
    rebuild = (
        f"Rebuild it on this machine: `deploy export --model {meta.model or 'MODEL'} --weights CHECKPOINT "
        f"--builder {runtime_builder}` (engines do not move between TensorRT versions or GPU architectures)."
    )
    onnx = Path(path).with_suffix(".onnx")
    if onnx.exists():
        rebuild += f" Meanwhile {onnx.name} runs on ONNX Runtime (the CPU path): pass it instead of the .engine."
    if meta.builder not in ("tensorrt", "tensorrt-rtx"):
        raise EngineCompatibilityError(f"{name}: sidecar says builder {meta.builder!r}, not a TensorRT engine")
    if meta.builder != runtime_builder:
        raise EngineCompatibilityError(
            f"{name} was built by {meta.builder} {meta.builder_version}, but this runtime is {runtime_builder} "
            f"{runtime_version}; the two engine formats are not interchangeable. {rebuild}"
        )
    if meta.builder_version:
        built, have = _version_key(meta.builder_version), _version_key(runtime_version)
        n = min(len(built), len(have))
        if built[:n] != have[:n]:
            raise EngineCompatibilityError(
                f"{name} was built with {meta.builder} {meta.builder_version}, this machine has {runtime_version}. "
                f"{rebuild}"
            )
    if meta.compute_capability and device_cc and meta.compute_capability != device_cc:
        gpu = f" ({meta.gpu_name})" if meta.gpu_name else ""
        raise EngineCompatibilityError(
            f"{name} was built for compute capability {meta.compute_capability}{gpu}, this GPU is {device_cc}. "
            f"{rebuild}"
        )


def check_engine_file(path: str | os.PathLike) -> bytes:
    data = Path(path).read_bytes()
    if len(data) < MIN_ENGINE_BYTES:
        raise EngineCompatibilityError(
            f"{Path(path).name} is {len(data)} bytes: truncated or not an engine. Rebuild or re-copy it."
        )
    return data


def import_trt(builder: str) -> Any:
    module = "tensorrt_rtx_bindings" if builder == "tensorrt-rtx" else "tensorrt"
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise EdgeDeployError(
            f"running a .engine needs the `{module}` Python package, which is not importable here. Install "
            f"TensorRT for this GPU (JetPack ships it on Jetson), or run the .onnx with ONNX Runtime instead."
        ) from e


def _collecting_logger(trt: Any) -> Any:
    """An ILogger that keeps error messages so a failed deserialisation can say why."""

    class Logger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            self.messages: list[str] = []

        def log(self, severity, msg):  # noqa: D401 - TensorRT callback
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append(str(msg))

    return Logger()


def check_plugins(trt: Any, meta: ArtifactMeta | None, name: str) -> None:
    """An engine whose sidecar names a plugin (`--nms trt`: EfficientNMS_TRT) needs its creator registered before
    deserialisation; say which library to load instead of TensorRT's bare "getPluginCreator could not find"."""
    plugin = (meta.postprocess or {}).get("plugin") if meta else None
    if not plugin:
        return
    logger = trt.Logger(trt.Logger.ERROR)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")
    registry = trt.get_plugin_registry()
    if registry.get_creator(plugin, "1", "") is None:
        raise EngineCompatibilityError(
            f"{name} uses the TensorRT plugin {plugin}, which this TensorRT does not register (the plugin library "
            "libnvinfer_plugin is missing, or this TensorRT dropped the plugin). Install TensorRT's plugin library, "
            "or re-export with `--nms onnx` (TensorRT's built-in NMS layer, no plugin)."
        )


def deserialize_engine(trt: Any, data: bytes, name: str) -> tuple[Any, Any, Any]:
    """(runtime, engine, logger); a plan TensorRT rejects is an EngineCompatibilityError carrying its log."""
    logger = _collecting_logger(trt)
    if hasattr(trt, "init_libnvinfer_plugins"):
        trt.init_libnvinfer_plugins(logger, "")  # EfficientNMS_TRT & co. must be registered before deserialising
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(data)
    if engine is None:
        log = "\n".join(logger.messages[-5:]) or "no message"
        hint = " If it uses a plugin, load the plugin library first." if "plugin" in log.lower() else ""
        raise EngineCompatibilityError(
            f"TensorRT could not deserialise {name} (truncated, or built by another TensorRT version/GPU). "
            f"Rebuild it on this machine.{hint}\nTensorRT said: {log}"
        )
    return runtime, engine, logger


class TensorRTEngine(Engine):
    backend = "tensorrt"
    device = "cuda"

    def __init__(self, path: str | os.PathLike, *, cuda_graph: bool = False, device: int = 0,
                 meta: ArtifactMeta | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self.device_index = device
        self.meta = meta if meta is not None else read_sidecar(self.path, required=False)
        builder = self.meta.builder if self.meta and self.meta.builder == "tensorrt-rtx" else "tensorrt"
        trt = self.trt = import_trt(builder)
        # Version and builder first: they need no GPU, and TensorRT must never see a plan it cannot read.
        check_engine_compat(self.meta, runtime_builder=builder, runtime_version=trt.__version__, device_cc="",
                            path=self.path)
        data = check_engine_file(self.path)
        try:
            cuda.init(device)
        except cuda.CudaError as e:  # no driver, no GPU, a driver older than the CUDA line: say what still runs
            onnx = self.path.with_suffix(".onnx")
            if onnx.exists():
                raise cuda.CudaError(f"{e}. Meanwhile {onnx.name} runs on ONNX Runtime (the CPU path).") from e
            raise
        check_engine_compat(self.meta, runtime_builder=builder, runtime_version=trt.__version__,
                            device_cc=cuda.compute_capability(device), path=self.path)
        check_plugins(trt, self.meta, self.path.name)
        self.runtime, self.engine, self.logger = deserialize_engine(trt, data, self.path.name)
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self._discover_io()
        self._allocate()
        self.use_cuda_graph = cuda_graph
        self.graph = cuda.CudaGraph() if cuda_graph else None
        self._current_shapes: dict[str, tuple[int, ...]] = {}
        self._events = [cuda.Event() for _ in range(4)]

    # ---- setup --------------------------------------------------------------------------------------------------
    def _discover_io(self) -> None:
        trt, eng = self.trt, self.engine
        self._max_shapes: dict[str, tuple[int, ...]] = {}
        for i in range(eng.num_io_tensors):
            name = eng.get_tensor_name(i)
            shape = tuple(int(d) for d in eng.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(eng.get_tensor_dtype(name)))
            spec = TensorSpec(name, shape, dtype)
            if eng.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(spec)
                if any(d == DYNAMIC for d in shape):
                    _, _, max_shape = eng.get_tensor_profile_shape(name, 0)
                    self._max_shapes[name] = tuple(int(d) for d in max_shape)
                    self.context.set_input_shape(name, self._max_shapes[name])
                else:
                    self._max_shapes[name] = shape
            else:
                self.outputs.append(spec)
        if self.inputs:
            self.max_batch = self._max_shapes[self.inputs[0].name][0]
        for spec in self.outputs:
            shape = tuple(int(d) for d in self.context.get_tensor_shape(spec.name))
            if any(d < 0 for d in shape):
                raise EdgeDeployError(
                    f"{self.path.name}: output {spec.name!r} has a data-dependent shape {shape} (e.g. an INMSLayer "
                    "without padding). Export with `--nms onnx` or `--nms trt` (fixed-size padded detections)."
                )
            self._max_shapes[spec.name] = shape

    def _allocate(self) -> None:
        self.device_buffers: dict[str, cuda.DeviceBuffer] = {}
        self.host_buffers: dict[str, cuda.PinnedBuffer] = {}
        for spec in self.inputs + self.outputs:
            shape = self._max_shapes[spec.name]
            nbytes = int(np.prod(shape)) * spec.dtype.itemsize
            self.device_buffers[spec.name] = cuda.DeviceBuffer(nbytes, shape, spec.dtype)
            self.host_buffers[spec.name] = cuda.PinnedBuffer(shape, spec.dtype)
            if self.context.set_tensor_address(spec.name, self.device_buffers[spec.name].ptr) is False:
                log = "\n".join(self.logger.messages[-3:]) or "no message"
                raise EdgeDeployError(f"{self.path.name}: TensorRT refused the device address of {spec.name!r} "
                                      f"(set_tensor_address returned False).\nTensorRT said: {log}")

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(device_buffers=True, stream=True, graph_capture=self.use_cuda_graph,
                            fp16_io=self.inputs[0].dtype == np.float16)

    def device_input(self, shape: tuple[int, ...]) -> int:
        name = self.inputs[0].name
        self.set_input_shapes({name: tuple(int(d) for d in shape)})
        return self.device_buffers[name].ptr

    # ---- execution --------------------------------------------------------------------------------------------
    def set_input_shapes(self, shapes: dict[str, tuple[int, ...]]) -> None:
        if shapes == self._current_shapes:
            return
        for name, shape in shapes.items():
            if not self.context.set_input_shape(name, shape):
                raise EdgeDeployError(f"{self.path.name}: input shape {shape} for {name!r} is outside the profile "
                                      f"(max {self._max_shapes[name]})")
        self._current_shapes = dict(shapes)
        if self.graph is not None:
            self.graph.reset()  # a graph bakes in shapes: re-capture on the next run

    def output_shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.context.get_tensor_shape(name))

    def _enqueue(self, stream: cuda.Stream) -> bool:
        return bool(self.context.execute_async_v3(stream.ptr))

    def execute(self) -> None:
        """Run on device buffers already filled (by `infer` or by the GPU preprocessor); no host copies."""
        if self.graph is not None and self.use_cuda_graph:
            if not self.graph.ready:
                if not self._enqueue(self.stream):  # TensorRT must enqueue once before capture
                    raise cuda.CudaError(f"execute_async_v3 failed for {self.path.name}")
                if not self.graph.capture(self.stream, self._enqueue):
                    self.use_cuda_graph = False  # fall back to plain enqueue for good; keep why
                return
            self.graph.launch(self.stream)
            return
        if not self._enqueue(self.stream):
            log = "\n".join(self.logger.messages[-3:])
            raise cuda.CudaError(f"execute_async_v3 failed for {self.path.name}: {log}")

    def device_outputs(self) -> dict[str, cuda.DeviceBuffer]:
        """Views of the output device buffers at their current shapes (for GPU post-processing)."""
        return {s.name: self.device_buffers[s.name].view(self.output_shape(s.name), s.dtype) for s in self.outputs}

    def fetch_outputs(self, done: cuda.Event | None = None) -> dict[str, np.ndarray]:
        """Copy every output at its current shape to the host (through the pinned buffers) and wait for it.
        `done` is recorded after the copies are enqueued (it times the D2H split)."""
        results: dict[str, np.ndarray] = {}
        for spec in self.outputs:
            shape = self.output_shape(spec.name)
            host = self.host_buffers[spec.name].array.reshape(-1)[: int(np.prod(shape))].reshape(shape)
            self.device_buffers[spec.name].copy_to_host(host, self.stream)
            results[spec.name] = host
        if done is not None:
            done.record(self.stream)
        self.stream.synchronize()
        return {k: v.copy() for k, v in results.items()}  # the next run overwrites the pinned buffers

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import time

        cuda.init(self.device_index)
        ev = self._events
        self.set_input_shapes({k: tuple(v.shape) for k, v in feed.items()})
        t0 = time.perf_counter()
        ev[0].record(self.stream)
        for name, x in feed.items():
            host = self.host_buffers[name].array.reshape(-1)[: x.size].reshape(x.shape)
            host[...] = x
            self.device_buffers[name].copy_from_host(host, self.stream)
        ev[1].record(self.stream)
        t_enq0 = time.perf_counter()
        self.execute()
        t_enq1 = time.perf_counter()
        ev[2].record(self.stream)
        results = self.fetch_outputs(done=ev[3])  # D2H copies, then synchronise
        t1 = time.perf_counter()
        self.last_timing = Timing(
            enqueue_ms=(t_enq1 - t_enq0) * 1e3,
            h2d_ms=ev[1].elapsed_ms(ev[0]),
            compute_ms=ev[2].elapsed_ms(ev[1]),
            d2h_ms=ev[3].elapsed_ms(ev[2]),
            latency_ms=(t1 - t0) * 1e3,
        )
        return results

    def close(self) -> None:
        """Release everything even when one release fails; the first CUDA error is raised at the end."""
        errors: list[cuda.CudaError] = []

        def attempt(fn) -> None:
            try:
                fn()
            except cuda.CudaError as e:
                errors.append(e)

        if getattr(self, "stream", None) is not None:
            attempt(self.stream.synchronize)  # queued work may still use the buffers
        if getattr(self, "graph", None) is not None:
            attempt(self.graph.reset)
        for buf in list(getattr(self, "device_buffers", {}).values()) + list(getattr(self, "host_buffers", {}).values()):
            attempt(buf.free)
        for e in getattr(self, "_events", []):
            attempt(e.close)
        self._events = []
        if getattr(self, "stream", None) is not None:
            attempt(self.stream.close)
            self.stream = None
        self.context = self.engine = None
        self.device_buffers, self.host_buffers = {}, {}
        if errors:
            raise errors[0]
