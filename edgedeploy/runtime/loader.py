"""`load_engine`: open an artifact with the backend its extension implies (or the one named).

The backend table maps each backend name to its `Engine` class (imported on first use) and what it needs
installed. Backends import `runtime.engine` (the interface); the interface never imports a backend.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from edgedeploy.errors import EdgeDeployError
from edgedeploy.models.artifact import ArtifactMeta
from edgedeploy.runtime.engine import Engine


@dataclass(frozen=True)
class Backend:
    """One row of the backend table: `engine_class()` imports the class (heavy imports happen only then),
    `requires` are the modules it needs, `suffixes` the artifacts it opens by default."""

    name: str
    engine_class: Callable[[], type[Engine]]
    requires: tuple[str, ...]
    suffixes: tuple[str, ...] = ()

    def available(self) -> bool:
        """The modules it needs are installed (a GPU may still be missing: `backends.gpu_backend_status`)."""
        return all(importlib.util.find_spec(m) is not None for m in self.requires)


def _tensorrt() -> type[Engine]:
    from edgedeploy.runtime.backends.tensorrt import TensorRTEngine

    return TensorRTEngine


def _onnxruntime() -> type[Engine]:
    from edgedeploy.runtime.backends.onnxruntime import OnnxRuntimeEngine

    return OnnxRuntimeEngine


def _onnxruntime_cuda() -> type[Engine]:
    from edgedeploy.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaEngine

    return OnnxRuntimeCudaEngine


def _torch() -> type[Engine]:
    from edgedeploy.runtime.backends.torch import TorchEngine

    return TorchEngine


BACKENDS: dict[str, Backend] = {
    "tensorrt": Backend("tensorrt", _tensorrt, ("tensorrt",), (".engine", ".plan", ".trt")),
    "onnxruntime": Backend("onnxruntime", _onnxruntime, ("onnxruntime",), (".onnx",)),
    "onnxruntime-cuda": Backend("onnxruntime-cuda", _onnxruntime_cuda, ("onnxruntime",)),
    "torch": Backend("torch", _torch, ("torch",), (".pt", ".pth", ".ckpt")),
}


def engine_kind(path: str | os.PathLike) -> str:
    """The backend an artifact's extension implies."""
    suffix = Path(path).suffix.lower()
    for backend in BACKENDS.values():
        if suffix in backend.suffixes:
            return backend.name
    raise EdgeDeployError(
        f"cannot tell the backend from {Path(path).name!r}: expected .engine/.plan (TensorRT), .onnx (ONNX Runtime) "
        "or .pt/.pth (PyTorch checkpoint, with --model NAME)"
    )


def load_engine(
    path: str | os.PathLike,
    *,
    backend: str | None = None,
    device: str | None = None,
    model: str | None = None,
    providers: Sequence[str] | None = None,
    cuda_graph: bool = False,
    num_classes: int | None = None,
    imgsz: int | None = None,
    meta: ArtifactMeta | None = None,
) -> Engine:
    """Open an artifact with the backend its extension implies (or `backend`).

    `.engine` -> TensorRT (sidecar checked first), `.onnx` -> ONNX Runtime, `.pt` -> PyTorch (registry model
    `model`, or what the checkpoint or its sidecar records; `num_classes`/`imgsz` override the recorded values and
    are validated by `models.artifact.describe_artifact`). `meta`: the artifact's sidecar when the caller has read
    it already (a TensorRT engine then does not read it again).
    """
    path = Path(path)
    if not path.exists():
        raise EdgeDeployError(f"{path} does not exist")
    kind = backend or engine_kind(path)
    if kind == "onnxruntime" and device and device.startswith("cuda") and not providers:
        kind = "onnxruntime-cuda"
    if kind not in BACKENDS:
        raise EdgeDeployError(f"unknown backend {kind!r}: choose {', '.join(BACKENDS)}")
    cls: Any = BACKENDS[kind].engine_class()
    if kind == "tensorrt":
        return cls(path, cuda_graph=cuda_graph, meta=meta)
    if kind == "onnxruntime-cuda":
        return cls(path, device_index=device_index(device))
    if kind == "onnxruntime":
        return cls(path, device=device, providers=providers)
    return cls.from_checkpoint(path, model=model, device=device, num_classes=num_classes, imgsz=imgsz,
                               cuda_graph=cuda_graph)


def device_index(device: str | None) -> int:
    """'cuda' -> 0, 'cuda:1' -> 1; anything else 0."""
    if device and device.startswith("cuda:"):
        try:
            return int(device.split(":", 1)[1])
        except ValueError as e:
            raise EdgeDeployError(f"device {device!r}: expected cuda or cuda:N") from e
    return 0
