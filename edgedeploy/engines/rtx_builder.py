"""Ahead-of-time engine builds with TensorRT-RTX (`tensorrt_rtx_bindings`, pip extra `edgedeploy[rtx]`).

It builds without a GPU (CPU-only AOT is its default), which is how CI proves every ONNX we write builds.
The engines run only on RTX-class GPUs (compute capability 8.0/8.6/8.9/12.x; an H100 is refused).
Timing caches are no-ops in TensorRT-RTX, so none is used.
"""

from __future__ import annotations

from types import ModuleType

from edgedeploy.engines.common import BuildRequest, BuildResult, build_engine, import_builder, nms_support
from edgedeploy.errors import BuilderUnavailableError

INSTALL_HINT = "TensorRT-RTX is not importable: `pip install edgedeploy[rtx]` (tensorrt-rtx-cu13-bindings + libs)."


def load_rtx() -> ModuleType:
    try:
        return import_builder("tensorrt_rtx_bindings")
    except ImportError as e:
        raise BuilderUnavailableError(INSTALL_HINT) from e


def build(req: BuildRequest, trt: ModuleType | None = None) -> BuildResult:
    trt = trt or load_rtx()
    req.meta.gpu_name, req.meta.compute_capability = "", ""  # AOT: not tied to the build machine's GPU
    return build_engine(trt, "tensorrt-rtx", req, use_timing_cache=False)


def supported_nms(trt: ModuleType | None = None) -> dict[str, str]:
    """{nms mode: "" if this builder builds it, else why not} (see engines.common.nms_support)."""
    trt = trt or load_rtx()
    return nms_support(trt, "tensorrt-rtx " + str(getattr(trt, "__version__", "")))
