"""The one GPU pipeline on a real GPU (marker `gpu`, skipped without one): PyTorch CUDA with NVRTC preprocessing,
CUDA graphs and GPU NMS, and ONNX Runtime CUDA with I/O binding, against the CPU path on the same frames.
The CPU-emulated twin of these checks is tests/test_gpu_pipelines.py."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from edgedeploy.runtime import Detector
from test_gpu_pipelines import FRAMES, _frames, _same_detections
from test_runtime_models import OracleDetector, make_detector_onnx

pytestmark = pytest.mark.gpu


def _oracle(device, **kw) -> Detector:
    model = OracleDetector()
    model.model_info = types.SimpleNamespace(name="oracle", task="detect", imgsz=64, mean=(0.485, 0.456, 0.406),
                                             std=(0.229, 0.224, 0.225), letterbox=True)
    return Detector.from_model(model, device=device, **kw)


@pytest.mark.parametrize("cuda_graph", [False, True])
def test_torch_cuda_gpu_path_equals_cpu_path(cuda_graph):
    frames = _frames()
    want = _oracle("cpu").predict_batch(frames)
    det = _oracle("cuda", cuda_graph=cuda_graph)
    assert det.gpu_pre is not None and det.gpu_pre.stream is det.engine.stream
    for _ in range(3):  # capture on the first call, replay after: every replay must see the new frames
        _same_detections(det.predict_batch(frames), want, atol=1.0)
        _same_detections(det.predict_batch(frames[::-1]), want[::-1], atol=1.0)
    on_gpu = [torch.from_numpy(f).cuda(non_blocking=True) for f in frames]  # frames produced on torch's stream
    _same_detections(det.predict_batch(on_gpu), want, atol=1.0)
    if cuda_graph:
        assert det.engine.use_cuda_graph, det.engine.graph_error
    det.close()


def test_ort_cuda_io_binding_on_the_gpu(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu not installed")
    from edgedeploy.runtime.backends.onnxruntime_cuda import OnnxRuntimeCudaEngine

    path = make_detector_onnx(tmp_path)
    frames = _frames()
    det = Detector(OnnxRuntimeCudaEngine(path))
    assert det.gpu_pre is not None
    _same_detections(det.predict_batch(frames), Detector(path, device="cpu").predict_batch(frames), atol=1.0)
    for (hw, box), d in zip(FRAMES, det.predict_batch(frames)):
        np.testing.assert_allclose(d.boxes[0], box, atol=max(hw) / 64 + 1)
