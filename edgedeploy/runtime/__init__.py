"""Inference runtime: one `Engine` interface over TensorRT, ONNX Runtime and PyTorch, task pipelines
(`Classifier`, `Detector`, `Segmenter`) on top of it, GPU pre/post-processing and the camera application.

Heavy imports (torch, onnxruntime, tensorrt, cuda-python) happen only when the backend that needs them is used;
the names below are resolved lazily so `import edgedeploy.runtime.cuda` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Engine": "engine",
    "TensorSpec": "engine",
    "Timing": "engine",
    "load_engine": "loader",
    "Classification": "pipelines",
    "Classifier": "pipelines",
    "Detections": "pipelines",
    "Detector": "pipelines",
    "Segmentation": "pipelines",
    "Segmenter": "pipelines",
    "load_pipeline": "pipelines",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"edgedeploy.runtime.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'edgedeploy.runtime' has no attribute {name!r}")
