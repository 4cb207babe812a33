"""A stand-in `tensorrt` module: an "engine" here is the exported ONNX plus a small header, executed by ONNX
Runtime on the fake CUDA device buffers (`fake_cuda`), through the same API calls `TensorRTEngine` makes
(num_io_tensors, get_tensor_*, profiles, set_input_shape, set_tensor_address, execute_async_v3 on a stream).

`execute_async_v3` queues the work on the stream with the shapes and addresses bound at that moment, so a
CUDA graph captured around it replays exactly those, as a real graph would.
"""

from __future__ import annotations

import json
import types
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from emulated import fake_cuda

MAGIC = b"EMULATED-TRT-PLAN\n"
VERSION = "10.99.0"


class TensorIOMode(IntEnum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class DataType(IntEnum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    INT64 = 8


_NP = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8, DataType.INT32: np.int32,
       DataType.BOOL: np.bool_, DataType.INT64: np.int64}
_ORT = {"tensor(float)": DataType.FLOAT, "tensor(float16)": DataType.HALF, "tensor(int32)": DataType.INT32,
        "tensor(int64)": DataType.INT64, "tensor(bool)": DataType.BOOL, "tensor(int8)": DataType.INT8}


def nptype(dt: DataType):
    return _NP[DataType(dt)]


class ILogger:
    class Severity(IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    def __init__(self, *a: Any) -> None:
        pass

    def log(self, severity, msg) -> None:  # pragma: no cover - overridden
        pass


class Logger(ILogger):
    ERROR = ILogger.Severity.ERROR
    WARNING = ILogger.Severity.WARNING

    def __init__(self, min_severity=ILogger.Severity.WARNING) -> None:
        super().__init__()


def init_libnvinfer_plugins(logger, namespace) -> bool:
    return True


class _Registry:
    def get_creator(self, name, version, namespace=""):
        return None


def get_plugin_registry() -> _Registry:
    return _Registry()


class Runtime:
    def __init__(self, logger: ILogger) -> None:
        self.logger = logger

    def deserialize_cuda_engine(self, data: bytes):
        if not bytes(data).startswith(MAGIC):
            self.logger.log(ILogger.Severity.ERROR, "IRuntime::deserializeCudaEngine: magic tag does not match")
            return None
        head, onnx_bytes = bytes(data)[len(MAGIC):].split(b"\n", 1)
        info = json.loads(head)
        if info.get("compute_capability") and info["compute_capability"] != fake_cuda.compute_capability():
            self.logger.log(ILogger.Severity.ERROR, "The engine plan file is generated on an incompatible device, "
                            f"expecting compute {fake_cuda.compute_capability()} got compute {info['compute_capability']}")
            return None
        return ICudaEngine(onnx_bytes, info)


class ICudaEngine:
    def __init__(self, onnx_bytes: bytes, info: dict) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_bytes, so, providers=["CPUExecutionProvider"])
        self.max_batch = int(info["max_batch"])
        fp16_io = bool(info.get("fp16_io"))
        self.io: dict[str, dict[str, Any]] = {}
        for mode, metas in ((TensorIOMode.INPUT, self.session.get_inputs()), (TensorIOMode.OUTPUT, self.session.get_outputs())):
            for m in metas:
                dt = _ORT[m.type]
                if fp16_io and dt == DataType.FLOAT:
                    dt = DataType.HALF  # FP16 I/O: the engine's bindings are half, its math as the ONNX says
                shape = tuple(d if isinstance(d, int) else -1 for d in m.shape)
                self.io[m.name] = {"mode": mode, "dtype": dt, "shape": shape}
        self.names = list(self.io)

    @property
    def num_io_tensors(self) -> int:
        return len(self.names)

    def get_tensor_name(self, i: int) -> str:
        return self.names[i]

    def get_tensor_mode(self, name: str) -> TensorIOMode:
        return self.io[name]["mode"]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.io[name]["shape"]

    def get_tensor_dtype(self, name: str) -> DataType:
        return self.io[name]["dtype"]

    def get_tensor_profile_shape(self, name: str, profile: int):
        shape = self.io[name]["shape"]
        return tuple(1 if d < 0 else d for d in shape), tuple(self.max_batch if d < 0 else d for d in shape), \
            tuple(self.max_batch if d < 0 else d for d in shape)

    def create_execution_context(self) -> "IExecutionContext":
        return IExecutionContext(self)


class IExecutionContext:
    def __init__(self, engine: ICudaEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.executions = 0

    def set_input_shape(self, name: str, shape) -> bool:
        shape = tuple(int(d) for d in shape)
        declared = self.engine.io[name]["shape"]
        if len(shape) != len(declared) or any(d >= 0 and d != s for d, s in zip(declared, shape)):
            return False
        if shape[0] < 1 or shape[0] > self.engine.max_batch:
            return False
        self.shapes[name] = shape
        return True

    def _batch(self) -> int:
        ins = [n for n in self.engine.names if self.engine.io[n]["mode"] == TensorIOMode.INPUT]
        return self.shapes[ins[0]][0] if ins and ins[0] in self.shapes else self.engine.max_batch

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if name in self.shapes:
            return self.shapes[name]
        b = self._batch()
        return tuple(b if d < 0 and i == 0 else d for i, d in enumerate(self.engine.io[name]["shape"]))

    def set_tensor_address(self, name: str, ptr: int) -> bool:
        if name not in self.engine.io:
            return False
        self.addresses[name] = int(ptr)
        return True

    def execute_async_v3(self, stream_handle: int) -> bool:
        eng = self.engine
        if set(self.addresses) != set(eng.names):
            return False
        stream = fake_cuda._stream_of(stream_handle)
        plan = {n: (self.addresses[n], self.get_tensor_shape(n), np.dtype(nptype(eng.io[n]["dtype"])))
                for n in eng.names}  # what a captured graph bakes in

        def run() -> None:
            feed, ort_in = {}, {m.name: m for m in eng.session.get_inputs()}
            for n, (ptr, shape, dt) in plan.items():
                if eng.io[n]["mode"] == TensorIOMode.INPUT:
                    nbytes = int(np.prod(shape)) * dt.itemsize
                    x = fake_cuda.LEDGER.memory(ptr, nbytes, f"engine input {n}").view(dt).reshape(shape)
                    feed[n] = x.astype(np.float32) if ort_in[n].type == "tensor(float)" else x.copy()
            outs = eng.session.run(None, feed)
            for m, y in zip(eng.session.get_outputs(), outs):
                ptr, shape, dt = plan[m.name]
                y = np.ascontiguousarray(y.astype(dt))
                if tuple(y.shape) != tuple(shape):
                    raise fake_cuda.CudaError(f"engine output {m.name}: ORT gave {y.shape}, bound shape {shape}")
                fake_cuda.LEDGER.memory(ptr, y.nbytes, f"engine output {m.name}")[:] = y.view(np.uint8).reshape(-1)

        self.executions += 1
        stream.enqueue(run)
        return True


def module() -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    for name in ("TensorIOMode", "DataType", "nptype", "ILogger", "Logger", "init_libnvinfer_plugins",
                 "get_plugin_registry", "Runtime"):
        setattr(m, name, globals()[name])
    m.__version__ = VERSION
    import importlib.machinery

    m.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)  # find_spec("tensorrt") callers need one
    return m


def install(monkeypatch) -> types.ModuleType:
    """`import tensorrt` gives the stand-in for the rest of the test (use together with `fake_cuda.install`)."""
    import sys

    m = module()
    monkeypatch.setitem(sys.modules, "tensorrt", m)
    return m


def build_engine(onnx_path: str | Path, engine_path: str | Path, *, max_batch: int = 4, fp16_io: bool = False,
                 compute_capability: str = "8.7") -> Path:
    """Write an emulated plan (header + ONNX) and the sidecar the runtime checks (builder, version, GPU)."""
    from edgedeploy.models.artifact import read_sidecar, write_sidecar

    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    head = json.dumps({"max_batch": max_batch, "fp16_io": fp16_io, "compute_capability": compute_capability,
                       "padding": " " * 1024})  # real plans are far larger than the runtime's truncation check
    engine_path.write_bytes(MAGIC + head.encode() + b"\n" + onnx_path.read_bytes())
    meta = read_sidecar(onnx_path, required=True)
    meta.builder, meta.builder_version, meta.compute_capability = "tensorrt", VERSION, compute_capability
    meta.batch = {"min": 1, "opt": max_batch, "max": max_batch}
    write_sidecar(engine_path, meta)
    return engine_path
