import importlib.util
import os

import pytest

os.environ.setdefault("MPLBACKEND", "Agg")


def _has_cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_trt = pytest.mark.skip(reason="needs `import tensorrt` (not installable in this project's CI)")
    skip_rtx = pytest.mark.skip(reason="needs tensorrt_rtx_bindings (pip install edgedeploy[rtx])")
    has_gpu = _has_cuda()
    has_trt = importlib.util.find_spec("tensorrt") is not None
    has_rtx = importlib.util.find_spec("tensorrt_rtx_bindings") is not None
    for item in items:
        if item.get_closest_marker("gpu") is not None and not has_gpu:
            item.add_marker(skip_gpu)
        if item.get_closest_marker("tensorrt") is not None and not has_trt:
            item.add_marker(skip_trt)
        if item.get_closest_marker("rtx") is not None and not has_rtx:
            item.add_marker(skip_rtx)
