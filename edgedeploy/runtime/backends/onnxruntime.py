"""ONNX Runtime backend: CPU everywhere, CUDA / TensorRT execution providers where the installed build has them."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edgedeploy.errors import EdgeDeployError
from edgedeploy.runtime.engine import DYNAMIC, Engine, TensorSpec, Timing

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}

# Preference order when device="cuda" (or unspecified): TensorRT EP, then CUDA EP, CPU as the fallback.
_GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


def _spec(arg) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else DYNAMIC for d in arg.shape)
    dtype = _ORT_TYPES.get(arg.type)
    if dtype is None:
        raise EdgeDeployError(f"tensor {arg.name!r} has type {arg.type}, which the runtime does not handle")
    return TensorSpec(arg.name, shape, np.dtype(dtype))


def choose_providers(device: str | None, available: Sequence[str]) -> list[str]:
    """CPU for device='cpu'; for 'cuda' the GPU providers present (error if none); for None the best present."""
    gpu = [p for p in _GPU_PROVIDERS if p in available]
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device is not None and device.startswith("cuda") and not gpu:
        raise EdgeDeployError(
            f"device={device!r} requested but this onnxruntime build has only {list(available)}; "
            "install onnxruntime-gpu, or run with --device cpu"
        )
    return gpu + ["CPUExecutionProvider"]


class OnnxRuntimeEngine(Engine):
    backend = "onnxruntime"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        device: str | None = None,
        providers: Sequence[str] | None = None,
        threads: int | None = None,
        spin: bool = True,
        quiet: bool = False,
    ) -> None:
        """`threads`: intra-op threads (and one inter-op thread); None: ORT's default. `spin=False` stops idle
        threads busy-waiting (they waste a shared CPU; benchmarks keep ORT's default). `quiet`: errors only in
        ORT's log."""
        super().__init__()
        import onnxruntime as ort

        self.path = Path(path)
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
            opts.inter_op_num_threads = 1
        if not spin:
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        if quiet:
            opts.log_severity_level = 3
        chosen = list(providers) if providers else choose_providers(device, ort.get_available_providers())
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=chosen)
        except Exception as e:  # ORT raises its own Fail/InvalidGraph/NoSuchFile types
            raise EdgeDeployError(f"ONNX Runtime could not load {self.path.name}: {e}") from e
        self.providers = self.session.get_providers()
        self.device = "cuda" if any(p in _GPU_PROVIDERS for p in self.providers) else "cpu"
        self.inputs = [_spec(a) for a in self.session.get_inputs()]
        self.outputs = [_spec(a) for a in self.session.get_outputs()]
        batch = self.inputs[0].shape[0] if self.inputs and self.inputs[0].shape else DYNAMIC
        self.max_batch = None if batch == DYNAMIC else batch
        self._output_names = [s.name for s in self.outputs]

    def _infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        try:
            values = self.session.run(self._output_names, feed)
        except Exception as e:
            raise EdgeDeployError(f"ONNX Runtime failed running {self.path.name}: {e}") from e
        ms = (time.perf_counter() - t0) * 1e3
        # ORT's run() is synchronous and copies in and out itself: the whole call is the compute time we can see.
        self.last_timing = Timing(enqueue_ms=ms, compute_ms=ms, latency_ms=ms)
        return dict(zip(self._output_names, values))

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
