"""Engine builds with TensorRT 10/11 (`import tensorrt`): strongly typed network, timing cache, profile.

Engine execution with TensorRT was not exercised in this project's CI (no TensorRT wheel is installable
there); the logic is unit-tested with a fake `tensorrt` module and integration tests run where it imports.
"""

from __future__ import annotations

from types import ModuleType

from edgedeploy.engines.common import BuildRequest, BuildResult, build_engine, cuda_device, import_builder, nms_support
from edgedeploy.errors import BuilderUnavailableError

INSTALL_HINT = (
    "TensorRT is not importable. Install it with `pip install tensorrt` (pulls from pypi.nvidia.com; needs "
    "a CUDA 12/13 driver), use NVIDIA's container `nvcr.io/nvidia/tensorrt:<yy.mm>-py3`, or on Jetson use "
    "JetPack's python3-libnvinfer (`sudo apt install python3-libnvinfer`). For ahead-of-time builds without "
    "a GPU: `pip install edgedeploy[rtx]` (TensorRT-RTX, RTX GPUs only)."
)


def load_tensorrt() -> ModuleType:
    try:
        return import_builder("tensorrt")
    except ImportError as e:
        raise BuilderUnavailableError(INSTALL_HINT) from e


def build(req: BuildRequest, trt: ModuleType | None = None) -> BuildResult:
    trt = trt or load_tensorrt()
    req.meta.gpu_name, req.meta.compute_capability = cuda_device()
    return build_engine(trt, "tensorrt", req, use_timing_cache=True)


def supported_nms(trt: ModuleType | None = None) -> dict[str, str]:
    """{nms mode: "" if this builder builds it, else why not} (see engines.common.nms_support)."""
    trt = trt or load_tensorrt()
    return nms_support(trt, "tensorrt " + str(getattr(trt, "__version__", "")))
